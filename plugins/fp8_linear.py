"""FP8 W8A8 linear layer: `(x_q * x_scale) @ (w_q * w_scale)^T (+ bias)`, per-tensor scales.

x_q float8_e4m3fn [M, K] (the activation already quantized with its static scale), w_q float8_e4m3fn [N, K],
x_scale and w_scale fp32 0-dim. On CUDA it is one `torch._scaled_mm` (FP8 tensor cores on Hopper and later,
fp32 accumulation, the scales applied to the accumulator); elsewhere the reference: both operands
dequantized to `out_dtype` and multiplied, which is exactly what the fake-quantized layer computes
(engines/network/quant_linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WHERE = "plugins/fp8_linear.py"


def fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    x = (x_q.float() * x_scale.float()).to(out_dtype)
    w = (w_q.float() * w_scale.float()).to(out_dtype)
    return F.linear(x, w, None if bias is None else bias.to(out_dtype))


def fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x_q [..., K] -> [..., N] in `out_dtype` (module docstring)."""
    if x_q.dtype != torch.float8_e4m3fn or w_q.dtype != torch.float8_e4m3fn or x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"{WHERE}: expected float8_e4m3fn x [..., K] and weight [N, K], got {x_q.dtype} "
                         f"{tuple(x_q.shape)} and {w_q.dtype} {tuple(w_q.shape)}")
    if not x_q.is_cuda:
        return fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    rows = x_q.reshape(-1, x_q.shape[-1])
    y = torch._scaled_mm(rows, w_q.t(), scale_a=x_scale.float().reshape(()), scale_b=w_scale.float().reshape(()),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return y.reshape(*x_q.shape[:-1], w_q.shape[0])
