"""What each quantized linear layer of a ModelOpt unified checkpoint holds, read and checked from its tensors.

For a linear layer `X` with logical weight [out, in] (export/names.py):

    format  X.weight                   X.weight_scale               X.weight_scale_2  X.input_scale
    nvfp4   uint8 [out, in/2]          float8_e4m3fn [out, in/16]   fp32 scalar       fp32 scalar (absent: W4A16)
    fp8     float8_e4m3fn [out, in]    fp32 scalar                  -                 fp32 scalar (absent: W8A16)
    bf16    float [out, in]            -                            -                 -

An attention layer's FP8 KV cache adds `k_proj.k_scale` / `v_proj.v_scale` (fp32 scalars), on a
k_proj / v_proj of any format. Scalars are 0-dim as ModelOpt writes them (one-element tensors are
accepted). The format is read from the tensors; hf_quant_config.json is not needed to interpret them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..export.checkpoint import QUANT_SUFFIXES, Checkpoint, CheckpointError
from ..export.names import expected_tensors
from .nvfp4 import BLOCK

NVFP4, FP8, BF16 = "nvfp4", "fp8", "bf16"
OUTPUT_SCALES = {"k_proj": "k_scale", "v_proj": "v_scale"}


@dataclass(frozen=True)
class LinearLayout:
    layer: str  # canonical module name, e.g. backbone.layers.1.mixer.experts.0.up_proj
    weight_format: str  # nvfp4, fp8 or bf16
    out_features: int
    in_features: int
    input_scale: bool  # activations fake-quantized with X.input_scale (W4A4 / W8A8)
    output_scale: str | None  # "k_scale" / "v_scale": the layer's output is the FP8-cached K or V

    def tensor_names(self) -> list[str]:
        """The tensors of this layer stored in a quantized form or as scales (a quantized weight included,
        an unquantized one not), as the checkpoint names them."""
        suffixes = []
        if self.weight_format != BF16:
            suffixes += ["weight", "weight_scale"]
        if self.weight_format == NVFP4:
            suffixes.append("weight_scale_2")
        if self.input_scale:
            suffixes.append("input_scale")
        if self.output_scale:
            suffixes.append(self.output_scale)
        return [f"{self.layer}.{s}" for s in suffixes]


def linear_layouts(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, LinearLayout]:
    """Every linear layer of `ckpt` that carries quantization tensors -> its checked layout.

    `expected` maps tensor names to their logical shapes (default: the whole model's, expected_tensors); a
    tensor-parallel rank's checkpoint passes the shapes of the rank's parts."""
    expected = expected_tensors(ckpt.spec) if expected is None else expected
    first_companion: dict[str, str] = {}
    for name in ckpt.names():
        layer, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES:
            first_companion.setdefault(layer, name)
    out = {}
    for layer, companion in first_companion.items():
        shape = expected.get(f"{layer}.weight")
        if shape is None or len(shape) != 2:
            raise CheckpointError(f"{ckpt.source_name(companion)}: quantization tensor of {layer}, which is not a "
                                  "linear layer of the model")
        out[layer] = _layout(ckpt, layer, *shape)
    return out


def _layout(ckpt: Checkpoint, layer: str, rows: int, cols: int) -> LinearLayout:
    def check(suffix: str, dtype: torch.dtype, shape: tuple[int, ...] | None, why: str) -> None:
        name = f"{layer}.{suffix}"
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: missing {name} ({why})")
        got_dtype, got_shape = ckpt.dtype(name), ckpt.shape(name)
        scalar_ok = shape is None and len(got_shape) <= 1 and _numel(got_shape) == 1
        if got_dtype != dtype or not (scalar_ok or got_shape == shape):
            want = "scalar" if shape is None else list(shape)
            raise CheckpointError(f"{ckpt.source_name(name)}: {str(got_dtype).replace('torch.', '')} "
                                  f"{list(got_shape)}, expected {str(dtype).replace('torch.', '')} {want} ({why})")

    weight_dtype = ckpt.dtype(f"{layer}.weight")
    has_scale = f"{layer}.weight_scale" in ckpt
    if weight_dtype == torch.uint8 and has_scale:
        fmt = NVFP4
        if cols % BLOCK:
            raise CheckpointError(f"{ckpt.source_name(layer + '.weight')}: NVFP4 layer with input dimension {cols}, "
                                  f"not a multiple of {BLOCK}")
        check("weight", torch.uint8, (rows, cols // 2), "NVFP4 codes, two per byte")
        check("weight_scale", torch.float8_e4m3fn, (rows, cols // BLOCK), f"one E4M3 scale per {BLOCK} inputs")
        check("weight_scale_2", torch.float32, None, "NVFP4 global scale")
    elif weight_dtype == torch.float8_e4m3fn and has_scale:
        fmt = FP8
        check("weight", torch.float8_e4m3fn, (rows, cols), "FP8 weight")
        check("weight_scale", torch.float32, None, "per-tensor FP8 scale")
    elif weight_dtype.is_floating_point and weight_dtype.itemsize >= 2 and not has_scale:
        fmt = BF16
        check("weight", weight_dtype, (rows, cols), "unquantized weight")
    else:
        raise CheckpointError(f"{ckpt.source_name(layer + '.weight')}: a {str(weight_dtype).replace('torch.', '')} "
                              f"weight {'with' if has_scale else 'without'} weight_scale is neither NVFP4 "
                              "(uint8 + E4M3 block scales) nor FP8 (float8_e4m3fn + fp32 scale)")
    input_scale = f"{layer}.input_scale" in ckpt
    if input_scale:
        if fmt == BF16:
            raise CheckpointError(f"{ckpt.source_name(layer + '.input_scale')}: input_scale on an unquantized weight")
        check("input_scale", torch.float32, None, "activation scale")
    kind = layer.rpartition(".")[2]
    output_scale = OUTPUT_SCALES.get(kind) if f"{layer}.{OUTPUT_SCALES.get(kind)}" in ckpt else None
    for other in set(OUTPUT_SCALES.values()) - {output_scale}:
        if f"{layer}.{other}" in ckpt:
            raise CheckpointError(f"{ckpt.source_name(f'{layer}.{other}')}: {other} belongs on "
                                  f"{'k_proj' if other == 'k_scale' else 'v_proj'}, not {kind}")
    if output_scale:
        check(output_scale, torch.float32, None, "FP8 KV-cache scale")
    return LinearLayout(layer, fmt, rows, cols, input_scale, output_scale)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
