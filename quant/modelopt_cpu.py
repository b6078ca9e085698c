"""ModelOpt's static NVFP4 fake quantization on a machine without CUDA.

ModelOpt 0.47 calibrates NVFP4 weights with static per-block scales (the `mse` algorithm of NVIDIA's
Nemotron 3 recipes, "four over six" included) through a Triton kernel it loads only when CUDA is
available (`modelopt.torch.kernels.quantization.gemm.static_blockwise_fp4_fake_quant`); on CPU the
MSE search stops with "requires triton". `static_fake_quantize` is the same computation in torch
(ModelOpt's `compute_fp4_scales`, then its `nvfp4_scalar_quant` per element, with nemo3's E2M1
rounding), bit-identical to the kernel (tests/test_modelopt_recipes.py runs ModelOpt's kernel in
Triton's interpreter as the oracle). `cpu_static_nvfp4()` lends it to ModelOpt while calibrating on
CPU; with CUDA, ModelOpt's own kernel runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .nvfp4 import E2M1_MAX, E2M1_VALUES, E4M3_MAX, e2m1_codes


def static_fake_quantize(x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None = None,
                         quantize_block_scales: bool = True, fp8_max_for_normalization: float = E4M3_MAX,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize of `x` with one static amax per block (`amax.numel()` blocks along the
    flattened `x`); the signature and result of ModelOpt's `static_blockwise_fp4_fake_quant`."""
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl

    blocks = amax.numel()
    if x.numel() % blocks:
        raise ValueError(f"x.numel() ({x.numel()}) is not divisible by amax.numel() ({blocks})")
    scale = amax.float() / E2M1_MAX
    if quantize_block_scales:
        top = amax.float().abs().amax() if global_amax is None else global_amax.float()
        scale = scaled_e4m3_impl(scale, top * (E4M3_MAX / fp8_max_for_normalization) / E2M1_MAX)
    scale = scale.reshape(blocks, 1)
    values = x.reshape(blocks, -1).float()
    bad = (scale == 0) | scale.isnan() | scale.isinf()
    safe = torch.where(bad, torch.ones_like(scale), scale)
    magnitude = E2M1_VALUES.to(x.device)[(e2m1_codes(values.abs() / safe) & 7).long()] * safe
    out = torch.where(values >= 0, magnitude, -magnitude)
    out = torch.where(scale == 0, torch.zeros_like(out), out)
    return out.reshape(x.shape).to(out_dtype or x.dtype)


@contextmanager
def cpu_static_nvfp4() -> Iterator[None]:
    """Within: ModelOpt's static NVFP4 fake quantization runs `static_fake_quantize` where ModelOpt has no
    Triton kernel (no CUDA); otherwise nothing changes."""
    import modelopt.torch.kernels.quantization.gemm as kernels

    if kernels.IS_AVAILABLE:
        yield
        return
    kernels.IS_AVAILABLE, kernels.static_blockwise_fp4_fake_quant = True, static_fake_quantize
    try:
        yield
    finally:
        kernels.IS_AVAILABLE = False
        del kernels.static_blockwise_fp4_fake_quant
