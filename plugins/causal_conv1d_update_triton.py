"""Triton kernel for plugins/causal_conv1d_update.py (imported only when the kernel runs: needs triton).

One program per (sequence, block of channels). The T new tokens extend the stored window into the
sequence [window (K-1 values) | x_0 .. x_{T-1}]; token t's output reads positions t .. t+K-1 of it,
straight from the pool or from x, so no window is shifted in registers. x values are rounded to the
pool's dtype first, exactly as they would be once stored in the window.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2


@triton.jit
def _load_sequence(pool_rows, x_rows, pos, mask, K, s_pool_k, s_x_t):
    """fp32 tile of the sequence [window | x] at positions pos (columns) for the channel rows of `mask`."""
    in_pool = pos < K - 1
    window = tl.load(pool_rows + pos[None, :] * s_pool_k, mask=mask & in_pool[None, :], other=0.0)
    new = tl.load(x_rows + (pos[None, :] - (K - 1)) * s_x_t, mask=mask & (pos >= K - 1)[None, :], other=0.0)
    return window.to(tl.float32) + new.to(pool_rows.dtype.element_ty).to(tl.float32)


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr, pool_ptr, w_ptr, bias_ptr, slots_ptr, out_ptr, inter_ptr,
    T, C, K,
    s_x_b, s_x_t, s_x_c,
    s_pool_s, s_pool_c, s_pool_k,
    s_w_c, s_w_k, s_bias,
    s_o_b, s_o_t, s_o_c,
    s_i_b, s_i_t, s_i_c, s_i_k,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_INTER: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    in_c = offs_c < C
    rows_ok = in_c & ((tl.zeros([BLOCK_C], tl.int64) + slot) >= 0)   # padding: no pool access, out = 0
    taps = rows_ok[:, None] & (offs_k < K)[None, :]
    kept = rows_ok[:, None] & (offs_k < K - 1)[None, :]

    w = tl.load(w_ptr + offs_c[:, None] * s_w_c + offs_k[None, :] * s_w_k, mask=taps, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c * s_bias, mask=in_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], tl.float32)
    pool_rows = pool_ptr + slot * s_pool_s + offs_c[:, None] * s_pool_c
    x_rows = x_ptr + b * s_x_b + offs_c[:, None] * s_x_c

    for t in range(T):
        window = _load_sequence(pool_rows, x_rows, t + offs_k, taps, K, s_pool_k, s_x_t)
        out = tl.sum(window * w, axis=1) + bias
        if SILU:
            out = out * tl.sigmoid(out)
        out = tl.where(rows_ok, out, 0.0)
        tl.store(out_ptr + b * s_o_b + t * s_o_t + offs_c * s_o_c, out.to(out_ptr.dtype.element_ty), mask=in_c)
        if HAS_INTER:
            after = _load_sequence(pool_rows, x_rows, t + 1 + offs_k, kept, K, s_pool_k, s_x_t)
            tl.store(inter_ptr + b * s_i_b + t * s_i_t + offs_c[:, None] * s_i_c + offs_k[None, :] * s_i_k,
                     after.to(inter_ptr.dtype.element_ty), mask=kept)
    final = _load_sequence(pool_rows, x_rows, T + offs_k, kept, K, s_pool_k, s_x_t)
    tl.debug_barrier()  # every thread has read the old window before any overwrites it
    tl.store(pool_rows + offs_k[None, :] * s_pool_k, final.to(pool_ptr.dtype.element_ty), mask=kept)


def _launch_config(batch: int, channels: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_C, num_warps): 256 channels per program, fewer when the grid would not fill the GPU (not in
    the interpreter, which runs one program at a time)."""
    block_c = min(256, next_power_of_2(channels))
    while on_gpu and block_c > 32 and batch * triton.cdiv(channels, block_c) < 512:
        block_c //= 2
    return block_c, 4 if block_c >= 128 else 1


def prepare(x, conv_pool, weight, bias, slots, silu, intermediate_states, on_gpu=None):
    """(out, grid, kernel args, kernel meta): the launch `launch` makes, for tools that compile it ahead of time
    (on_gpu: the launch for a GPU whatever device the tensors are on; default: x's device)."""
    Bt, T, C = x.shape
    K = weight.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    slots = slots.contiguous()                             # read as slots_ptr + row
    block_c, num_warps = _launch_config(Bt, C, x.is_cuda if on_gpu is None else on_gpu)
    bias_arg = bias if bias is not None else weight          # never read when HAS_BIAS is False
    inter = intermediate_states if intermediate_states is not None else conv_pool
    i_strides = intermediate_states.stride() if intermediate_states is not None else (0, 0, 0, 0)
    args = (x, conv_pool, weight, bias_arg, slots, out, inter,
            T, C, K,
            *x.stride(), *conv_pool.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
            *out.stride(), *i_strides)
    meta = dict(HAS_BIAS=bias is not None, SILU=bool(silu), HAS_INTER=intermediate_states is not None,
                BLOCK_C=block_c, BLOCK_K=next_power_of_2(K), num_warps=num_warps)
    return out, (Bt, triton.cdiv(C, block_c)), args, meta


def launch(*inputs):
    """Runs the kernel on the inputs of plugins/causal_conv1d_update.py's op; returns out."""
    out, grid, args, meta = prepare(*inputs)
    if out.numel():
        _causal_conv1d_update_kernel[grid](*args, **meta)
    return out
