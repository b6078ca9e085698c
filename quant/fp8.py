"""FP8 (E4M3) per-tensor numerics for weights, activations and the KV cache.

One fp32 scale per tensor, `amax / 448`: ModelOpt's `weight_scale`, `input_scale` (from the calibrated
activation amax) and `k_scale` / `v_scale` (from the calibrated K/V amax; the unified HF export does
not clamp them to 1.0). A value decodes as `q.float() * scale`.

Quantization is `x / scale` with torch's promotion rules (a 0-dim fp32 scale keeps a bf16 `x` in
bf16, so the quotient is rounded to bf16 before the E4M3 cast), saturated to +-448 and cast to E4M3
with round-to-nearest-even: exactly ModelOpt 0.47's `to_quantized_weight` for weights, and the
ONNX QuantizeLinear rule for activations. ModelOpt's own fake-quantizer multiplies by `448 / amax`
instead, which can differ from the division in the last bit of a rare value.

Choices where ModelOpt gives no usable answer: NaN or Inf in a weight is an error naming the tensor;
an all-zero weight gets scale 0 and zero codes (ModelOpt 0.47 exports NaN codes there).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor fp32 scale `amax / 448` (0-dim)."""
    return torch.as_tensor(amax).float().reshape(()) / E4M3_MAX


def quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x [...] (float) -> float8_e4m3fn [...], saturating; a zero scale gives zeros.

    `scale` is one scalar, or one per row (shape x.shape[:-1]: routed experts, each (token, expert) pair
    quantized with its expert's scale; the quotient is then computed in fp32). Branch-free, with no host
    reads: it runs inside compiled graphs.
    """
    scale = _broadcast(torch.as_tensor(scale, device=x.device).float(), x)
    q = torch.where(scale == 0, torch.zeros_like(x), x / scale)
    return q.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn [...] -> `dtype` [...]: the product in fp32, rounded once to `dtype` (scale as in `quantize`).

    (ModelOpt's `FP8QTensor.dequantize` multiplies in `dtype`, rounding the scale to bf16 first.)
    """
    return (q.float() * _broadcast(torch.as_tensor(scale, device=q.device).float(), q)).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize-dequantize an activation or K/V tensor with its static calibrated scale (one, or one per row);
    x's shape and dtype. Compiled, the E4M3 rounding is `round_to_e4m3` (the same bits; it vectorizes), and a scale
    given as a Python number (an fp32 value, QuantLinear.static_input_scale) is a constant of the graph's code
    rather than a tensor the graph reads on every call."""
    if not torch.compiler.is_compiling():
        return dequantize(quantize(x, scale), scale, x.dtype)
    if isinstance(scale, float):
        if scale == 0:
            return torch.zeros_like(x)
        return (round_to_e4m3((x / scale).clamp(-E4M3_MAX, E4M3_MAX).float()) * scale).to(x.dtype)
    scale = _broadcast(torch.as_tensor(scale, device=x.device).float(), x)
    q = torch.where(scale == 0, torch.zeros_like(x), x / scale).clamp(-E4M3_MAX, E4M3_MAX)
    return (round_to_e4m3(q.float()) * scale).to(x.dtype)


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """fp32 y with |y| <= 448 (or NaN) rounded to the nearest E4M3 value, ties to even, in fp32: exactly
    `y.to(float8_e4m3fn).float()`, signed zeros included (tests/test_quant_compiled.py checks every pattern of the
    high mantissa bits at every rounding boundary). In fp32 arithmetic because inductor's CPU code converts to
    float8 one element at a time: this vectorizes, and halves a compiled fake quantization's cost.

    E4M3 keeps 3 mantissa bits: the spacing of its values is 2**(floor(log2|y|) - 3), and 2**-9 below 2**-6
    (subnormals); y / spacing is exact (a power of two), `round` is half-to-even, the product exact."""
    binade = (y.view(torch.int32) & 0x7F800000).view(torch.float32)  # 2**floor(log2|y|) (0 for 0 and fp32 subnormals)
    spacing = (binade * 0.125).clamp(min=2.0**-9)
    return torch.round(y / spacing) * spacing


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-dim (or one-element) scale as 0-dim, a per-row scale [x.shape[:-1]] as [..., 1]."""
    if scale.numel() == 1 and scale.dim() <= 1:
        return scale.reshape(())
    if scale.shape != x.shape[:-1]:
        raise ValueError(f"fp8: per-row scales of shape {tuple(scale.shape)} for a tensor of shape {tuple(x.shape)}")
    return scale[..., None]


def quantize_weight(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [...] -> (float8_e4m3fn [...], fp32 0-dim `weight_scale`)."""
    if not w.is_floating_point():
        raise ValueError(f"{name}: dtype {w.dtype} is not a floating-point type")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: contains NaN or Inf; cannot quantize to FP8")
    scale = scale_from_amax(w.abs().amax())
    return quantize(w, scale), scale
