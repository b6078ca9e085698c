"""Checkpoints and calibrated models shared by test_quant_export.py and test_compare.py."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import hf_model, make_config, save_hf_checkpoint
from safetensors.torch import load_file, save_file

from nemo3.export.builtin import BUILTIN_DIR
from nemo3.export.names import expected_tensors
from nemo3.export.spec import ModelSpec

# every Nemotron 3 layer kind, LatentMoE, MTP; widths NVFP4 blocks divide, so every recipe applies;
# the built-in tokenizer's vocabulary, so the corpus can be encoded; dt floored at time_step_min as
# transformers' torch path does
TINY = make_config("mtp", moe_shared_expert_intermediate_size=32, vocab_size=4096,
                   time_step_limit=(0.001, math.inf))
BUILTIN_WEIGHTS = BUILTIN_DIR / "model.safetensors"
needs_builtin = pytest.mark.skipif(not BUILTIN_WEIGHTS.exists(),
                                   reason=f"{BUILTIN_WEIGHTS} is absent (the built-in model is not trained yet)")


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """save_pretrained of a random tiny model, plus random mtp.* tensors (transformers has none) and the
    built-in tokenizer files."""
    save_hf_checkpoint(hf_model(TINY, seed), folder)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = load_file(folder / "model.safetensors")
    for name, shape in expected_tensors(ModelSpec.from_config(TINY)).items():
        if name.startswith("mtp."):
            noise = torch.randn(shape, generator=g)
            tensors[name] = 1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BUILTIN_DIR / name, folder / name)
    return folder


def random_windows(vocab_size: int, count: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def one_thread():
    """torch with one CPU thread: on the shared, oversubscribed test machines some multi-threaded CPU
    kernels (index_add_ in the MoE) spin for ~0.1 s per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
