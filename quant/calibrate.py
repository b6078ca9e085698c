"""Calibration: ModelOpt's `mtq.quantize` on transformers' NemotronHForCausalLM with a recipe's quant_cfg.

    model = calibrate("ckpt/", RECIPES["nvfp4"], windows)     # windows: int64 [n, T] (quant/data.py)
    export_quantized(model, open_checkpoint("ckpt/"), out)   # quant/export.py

The model is loaded from the checkpoint folder in BF16, the deployment dtype (the checkpoint's
unquantized tensors are exported in it, and ModelOpt packs the BF16 weights). ModelOpt wraps each
fused `NemotronHExperts` in its `_QuantNonGatedFusedExperts` (one weight quantizer per expert, one
input quantizer per layer) and each attention module for K/V quantization; the recipe decides which
quantizers are on (quant/recipes.py). Calibration is the recipe's algorithm (`max` for nemo3's
tables; NVIDIA's recipes also use `mse`, with the FP8 scale sweep or four-over-six multipliers, whose
static NVFP4 weight search runs nemo3's torch copy of ModelOpt's kernel on CPU: quant/modelopt_cpu.py),
with one forward over every window, in batches, with `use_cache=False` (transformers' cache building fails for some layer patterns), and
on transformers' torch Mamba path with one chunk per window (`single_chunk_scan`: its multi-chunk
scan is wrong in 5.14). Runs on CPU and CUDA. transformers drops the `mtp.*` weights; they stay BF16 (quant/export.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.checkpoint import canonical_name, check_finite
from .modelopt_cpu import cpu_static_nvfp4
from .recipes import Recipe

ARCHITECTURE = "NemotronHForCausalLM"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_transformers_model(folder: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.bfloat16):
    """transformers' NemotronHForCausalLM from a checkpoint folder, in eval mode, with `config.architectures`
    set (ModelOpt's export refuses a model without it)."""
    from transformers import NemotronHForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the dropped mtp.* weights are expected: nemo3 carries them itself
    try:
        model = NemotronHForCausalLM.from_pretrained(folder, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    for name, tensor in model.state_dict().items():  # the build's first read of the weights: check them here
        check_finite(tensor, f"{folder}: {canonical_name(name)}")
    model.config.architectures = [ARCHITECTURE]
    return model.to(device).eval()


def calibrate(folder: str | Path, recipe: Recipe, windows: torch.Tensor, device: str | torch.device | None = None,
              batch_size: int = 8, progress: bool = True):
    """Quantize the checkpoint in `folder` with `recipe`, calibrating on `windows` (int64 [n, T]).

    Returns the calibrated transformers model (ModelOpt fake-quant modules, weights still BF16),
    ready for `quant/export.py`.
    """
    import modelopt.torch.quantization as mtq
    from tqdm import tqdm

    from ..export.checkpoint import open_checkpoint

    spec = open_checkpoint(folder).spec
    quant_cfg = recipe.to_modelopt_quant_cfg(spec)  # checks the recipe against the model first
    device = torch.device(device or default_device())
    model = load_transformers_model(folder, device)

    def forward_loop(m) -> None:
        with torch.no_grad(), tqdm(total=windows.shape[0], unit="seq", desc=f"calibrating {recipe.name}",
                                   disable=not progress, dynamic_ncols=True) as bar:
            for batch in windows.split(batch_size):
                m(batch.to(device), use_cache=False)
                bar.update(batch.shape[0])

    single_chunk_scan(model, windows.shape[1], device)
    with cpu_static_nvfp4():
        mtq.quantize(model, quant_cfg, forward_loop)
    return model


def single_chunk_scan(model, length: int, device: torch.device) -> None:
    """Work around transformers 5.14's torch (non-kernel) Mamba-2 path, which sums the inter-chunk
    recurrence over the wrong axis (huggingface/transformers#47246) and so is wrong for sequences
    longer than one chunk: give its scan one chunk of at least `length` tokens (the same math, done
    in one piece). The CUDA kernel path, when installed, is correct and keeps its chunk size."""
    from transformers.models.nemotron_h import modeling_nemotron_h

    if modeling_nemotron_h.is_fast_path_available and device.type == "cuda":
        return
    for module in model.modules():
        if isinstance(module, modeling_nemotron_h.NemotronHMamba2Mixer):
            module.chunk_size = max(module.chunk_size, length)
