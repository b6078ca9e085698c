"""NVFP4 numerics: quantize, pack, unpack, dequantize, and the activation fake-quantizer.

NVFP4 stores a tensor [..., K] as

* `packed`       uint8 [..., K/2]            two E2M1 codes per byte, the even-index element in the
                                             low nibble (ModelOpt export name: `weight`);
* `block_scale`  float8_e4m3fn [..., K/16]   one scale per block of 16 along the last (input) dim
                                             (`weight_scale`);
* `global_scale` float32 scalar              `amax / (6 * 448)` (`weight_scale_2`; `input_scale` for
                                             activations).

A value decodes as `E2M1[code] * block_scale * global_scale`. An E2M1 code is sign << 3 | index
into the magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}.

Every formula below is ModelOpt 0.47's, so the weights are bit-identical to `NVFP4QTensor.quantize`
and to `export_hf_checkpoint` (tests/test_nvfp4.py checks it):

* global scale: `amax.float() / 2688` (fp32 division);
* block scale: `block_amax / (6 * global_scale)` (the product rounded to fp32 first), an all-zero
  block gets 1.0, then clamped to [2**-9, 448] and cast to E4M3 (round to nearest even);
* values: `x.float() / (block_scale.float() * global_scale)`, rounded to the nearest E2M1
  magnitude with ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
  3.5 -> 4, 5 -> 4), saturating at 6; the sign bit is `x < 0`.

Choices where ModelOpt gives no usable answer:

* K not a multiple of 16 is an error naming the tensor. `NVFP4QTensor.quantize` zero-pads the last
  block, but ModelOpt's export refuses such a weight ("Weight shape is not divisible for block size")
  and the GEMM kernels need whole blocks, so no NVFP4 checkpoint can hold one.
* An all-zero tensor encodes as zero codes, block scales 1.0 and global scale 0 (ModelOpt 0.47
  divides 0 by 0 there and exports NaN scales with codes of +-6).
* NaN or Inf in a weight is an error naming the tensor.

Activations are fake-quantized like ModelOpt's dynamic NVFP4 input quantizer (its Triton kernel
`fp4_fake_quant_block`): per-block scales computed on the fly against the calibrated global scale,
with its own edge rules (no 2**-9 floor; a dequantized block scale below 1e-5 becomes 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plugins.grouped_gemm import E2M1_VALUES as _E2M1
from ..plugins.grouped_gemm import NVFP4_BLOCK, dequantize_nvfp4
from . import fp8

BLOCK = NVFP4_BLOCK
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = torch.tensor(_E2M1)  # magnitudes by code & 7; codes 8..15 are the negatives
# (midpoint between neighbouring E2M1 magnitudes, whether a tie there rounds up (to the even code)): a magnitude's
# index is the number of midpoints it passes
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_MIN_BLOCK_SCALE = 2.0**-9  # smallest E4M3 subnormal


@dataclass(frozen=True)
class NVFP4Tensor:
    """A quantized tensor of logical shape [..., K]; see the module docstring for the layout."""

    packed: torch.Tensor  # uint8 [..., K/2]
    block_scale: torch.Tensor  # float8_e4m3fn [..., K/16]
    global_scale: torch.Tensor  # float32, 0-dim

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.block_scale, self.global_scale, dtype)


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor fp32 scale `amax / (6 * 448)`: ModelOpt's `weight_scale_2` and NVFP4 `input_scale`."""
    return torch.as_tensor(amax).float().reshape(()) / (E2M1_MAX * E4M3_MAX)


def block_scales(x: torch.Tensor, global_scale: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """E4M3 per-block scales [..., K/16] of `x` [..., K] against `global_scale`."""
    _check_blocks(x, name)
    g = torch.as_tensor(global_scale, device=x.device).float().reshape(())
    block_amax = x.reshape(*x.shape[:-1], -1, BLOCK).abs().amax(dim=-1).float()
    if g == 0:
        if block_amax.any():
            raise ValueError(f"{name}: global scale is 0 but the tensor is not all zeros")
        return torch.ones_like(block_amax).to(torch.float8_e4m3fn)
    scale = block_amax / (E2M1_MAX * g)
    scale[scale == 0] = 1.0
    return scale.clamp(min=_MIN_BLOCK_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, global_scale: torch.Tensor | None = None, block_scale: torch.Tensor | None = None,
             name: str = "tensor") -> NVFP4Tensor:
    """Quantize a weight `x` [..., K] (any float dtype) to NVFP4.

    `global_scale` defaults to `amax(|x|) / 2688` and `block_scale` to `block_scales(x, global_scale)`.
    Pass them to reproduce an export whose scales came from elsewhere: ModelOpt computes them from
    the model's weight (and calibrated amax) but packs `weight.to(export dtype)`.
    """
    _check_blocks(x, name)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf; cannot quantize to NVFP4")
    if global_scale is None:
        global_scale = global_scale_from_amax(x.abs().amax())
    g = torch.as_tensor(global_scale, device=x.device).float().reshape(())
    if block_scale is None:
        block_scale = block_scales(x, g, name)
    elif block_scale.shape != (*x.shape[:-1], x.shape[-1] // BLOCK):
        raise ValueError(f"{name}: block_scale shape {tuple(block_scale.shape)} does not match "
                         f"{tuple(x.shape)} in blocks of {BLOCK}")
    if g == 0:
        codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    else:
        step = (block_scale.float() * g).unsqueeze(-1)  # [..., K/16, 1]
        scaled = x.reshape(*x.shape[:-1], -1, BLOCK) / step
        codes = e2m1_codes(scaled.reshape(x.shape))
    return NVFP4Tensor(pack(codes), block_scale, g)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8 0..15, same shape), ties to even, saturating at 6."""
    return _magnitude_index(x.float().abs()) | ((x < 0).to(torch.uint8) << 3)


def _magnitude_index(a: torch.Tensor) -> torch.Tensor:
    """Index (uint8 0..7) of the E2M1 magnitude nearest to each a >= 0 (already scaled), ties to the even index."""
    if torch.compiler.is_compiling():  # comparisons only: fused into the graph's vector loop
        return sum(passed.to(torch.uint8) for passed in _past_midpoints(a))
    # eagerly, two library calls instead of seven comparisons: a tie lands on the lower index, unless it rounds up
    a = a.contiguous()  # (bucketize copies a strided input, with a warning)
    index = torch.bucketize(a, torch.tensor([m for m, _ in _MIDPOINTS], device=a.device))
    index += torch.isin(a, torch.tensor([m for m, up in _MIDPOINTS if up], device=a.device))
    return index.to(torch.uint8)


def _rounded_magnitude(a: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude nearest to each a >= 0 (fp32), as `_magnitude_index` picks it."""
    if torch.compiler.is_compiling():
        return round_to_e2m1(a)
    return E2M1_VALUES.to(a.device)[_magnitude_index(a).long()]


def round_to_e2m1(a: torch.Tensor) -> torch.Tensor:
    """fp32 a >= 0 rounded to the nearest E2M1 magnitude, ties to the even code, saturating at 6, in fp32
    arithmetic: exactly the magnitude `_magnitude_index` picks (tests/test_quant_compiled.py checks every
    boundary). Six vector operations where the midpoint comparisons take fourteen: compiled, the dense
    expert path of a prefill chunk fake-quantizes every token once per expert.

    E2M1 keeps one mantissa bit: its values are spaced 0.5 below 2, 1 in [2, 4) and 2 from 4; a / spacing is
    exact (a power of two), `round` is half-to-even, which is the even code, and the product is exact."""
    spacing = torch.where(a >= 4.0, 2.0, torch.where(a >= 2.0, 1.0, 0.5))
    return torch.where(a < E2M1_MAX, torch.round(a / spacing) * spacing, E2M1_MAX)  # (NaN saturates, like eagerly)


def _past_midpoints(a: torch.Tensor):
    """Whether a has passed each E2M1 midpoint."""
    for midpoint, tie_up in _MIDPOINTS:
        yield (a >= midpoint) if tie_up else (a > midpoint)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K even) -> bytes [..., K/2], element 2j in the low nibble of byte j."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] -> uint8 codes [..., K]."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [..., K/2], block_scale [..., K/16], global_scale scalar -> [..., K] in `dtype` (the decoder the
    GEMM kernels' reference uses, plugins/grouped_gemm.py)."""
    return dequantize_nvfp4(packed, block_scale, global_scale, dtype)


def fake_quantize(x: torch.Tensor, global_scale: torch.Tensor | float, name: str = "activation") -> torch.Tensor:
    """NVFP4 quantize-dequantize of an activation `x` [..., K] with its calibrated `input_scale`.

    Same shape and dtype as `x`. Block scales are dynamic: `e4m3(min(block_amax / (6 g), 448)) * g`,
    replaced by 1.0 below 1e-5 (so a block that small flushes to zero); values are rounded like
    weights and the sign follows `x >= 0`. `global_scale` is one scalar, or one per row: shape
    x.shape[:-1] (routed experts, each pair quantized with its expert's scale), or a Python number (an fp32
    value, QuantLinear.static_input_scale: a constant of a compiled graph's code, not a tensor it reads on every
    call). Branch-free, with no host reads: it runs inside compiled graphs.
    """
    _check_blocks(x, name)
    if isinstance(global_scale, float):
        g = global_scale if global_scale > 0 else _ZERO_GLOBAL_SCALE
    else:
        g = torch.as_tensor(global_scale, device=x.device).float()
        if g.dim():  # one scale per row: broadcast over the row's blocks and their elements
            if g.shape != x.shape[:-1]:
                raise ValueError(f"{name}: per-row global scales of shape {tuple(g.shape)} for an activation of "
                                 f"shape {tuple(x.shape)}")
            g = g[..., None, None]
        g = torch.where(g > 0, g, torch.full_like(g, _ZERO_GLOBAL_SCALE))
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    magnitude = blocks.abs()
    block_amax = magnitude.amax(dim=-1, keepdim=True)
    scale = (block_amax / (E2M1_MAX * g)).clamp(max=E4M3_MAX)
    scale = (fp8.round_to_e4m3(scale) if torch.compiler.is_compiling() else scale.to(torch.float8_e4m3fn).float()) * g
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    rounded = _rounded_magnitude(magnitude / scale) * scale
    out = torch.where(blocks >= 0, rounded, -rounded)
    return out.reshape(x.shape).to(x.dtype)


# a zero global scale (an all-zero calibration) is replaced by this fp32 value: every block then flushes to zero
_ZERO_GLOBAL_SCALE = float(torch.tensor(1e-12, dtype=torch.float32))


def _check_blocks(x: torch.Tensor, name: str) -> None:
    if x.dim() == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"{name}: last dimension of shape {tuple(x.shape)} is not a multiple of the NVFP4 "
                         f"block size {BLOCK} (ModelOpt's export refuses such tensors too)")
    if not x.is_floating_point():
        raise ValueError(f"{name}: dtype {x.dtype} is not a floating-point type")
