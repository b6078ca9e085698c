"""Triton kernel for plugins/mamba2_state_update.py (imported only when the kernel runs: needs triton).

Memory bound: each program owns one (sequence, head, block of P rows) tile of the fp32 state, reads it
once, applies the T tokens in registers (B/C/x/dt are small and shared through L2) and writes it once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2


@triton.jit
def _mamba2_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr, z_ptr, y_ptr, inter_ptr,
    T, P, N, heads_per_group, dt_min, dt_max,
    s_state_s, s_state_h, s_state_p, s_state_n,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dt_b, s_dt_t, s_dt_h,
    s_B_b, s_B_t, s_B_g, s_B_n,
    s_C_b, s_C_t, s_C_g, s_C_n,
    s_z_b, s_z_t, s_z_h, s_z_p,
    s_y_b, s_y_t, s_y_h, s_y_p,
    s_i_b, s_i_t, s_i_h, s_i_p, s_i_n,
    s_A, s_D, s_dt_bias,
    DT_SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_INTER: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    g = h // heads_per_group

    slot = tl.load(slots_ptr + b).to(tl.int64)
    # rows of a real sequence (slot >= 0): padding rows neither read nor write the pool and output 0
    rows_ok = mask_p & ((tl.zeros([BLOCK_P], tl.int64) + slot) >= 0)
    tile_mask = rows_ok[:, None] & mask_n[None, :]
    state_ptrs = (state_ptr + slot * s_state_s + h * s_state_h
                  + offs_p[:, None] * s_state_p + offs_n[None, :] * s_state_n)
    state = tl.load(state_ptrs, mask=tile_mask, other=0.0)

    A = tl.load(A_ptr + h * s_A).to(tl.float32)
    D = tl.load(D_ptr + h * s_D).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h * s_dt_bias).to(tl.float32)

    for t in range(T):
        x = tl.load(x_ptr + b * s_x_b + t * s_x_t + h * s_x_h + offs_p * s_x_p, mask=mask_p, other=0.0)
        x = x.to(tl.float32)
        dt = tl.load(dt_ptr + b * s_dt_b + t * s_dt_t + h * s_dt_h).to(tl.float32) + dt_bias
        if DT_SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dA = tl.exp(dt * A)
        Bv = tl.load(B_ptr + b * s_B_b + t * s_B_t + g * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0)
        Cv = tl.load(C_ptr + b * s_C_b + t * s_C_t + g * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0)
        state = state * dA + (x * dt)[:, None] * Bv.to(tl.float32)[None, :]
        y = tl.sum(state * Cv.to(tl.float32)[None, :], axis=1) + D * x
        if HAS_Z:
            z = tl.load(z_ptr + b * s_z_b + t * s_z_t + h * s_z_h + offs_p * s_z_p, mask=mask_p, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        y = tl.where(rows_ok, y, 0.0)
        tl.store(y_ptr + b * s_y_b + t * s_y_t + h * s_y_h + offs_p * s_y_p, y.to(y_ptr.dtype.element_ty),
                 mask=mask_p)
        if HAS_INTER:
            inter_ptrs = (inter_ptr + b * s_i_b + t * s_i_t + h * s_i_h
                          + offs_p[:, None] * s_i_p + offs_n[None, :] * s_i_n)
            tl.store(inter_ptrs, state, mask=tile_mask)
    tl.store(state_ptrs, state, mask=tile_mask)


def _launch_config(batch: int, H: int, P: int, N: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_N, num_warps): about 2K state elements per program (16 per thread), fewer rows
    per program when the grid would not fill the GPU (not in the interpreter, which runs one at a time)."""
    block_n = next_power_of_2(N)
    block_p = min(next_power_of_2(P), max(1, 2048 // block_n))
    while on_gpu and block_p > 1 and batch * H * triton.cdiv(P, block_p) < 1024:
        block_p //= 2
    num_warps = 4 if block_p * block_n >= 1024 else 2 if block_p * block_n >= 256 else 1
    return block_p, block_n, num_warps


def prepare(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, dt_softplus, dt_min, dt_max, intermediate_states,
            on_gpu=None):
    """(y, grid, kernel args, kernel meta): the launch `launch` makes, for tools that compile it ahead of time
    (on_gpu: the launch for a GPU whatever device the tensors are on; default: x's device)."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    slots = slots.contiguous()                             # read as slots_ptr + row
    block_p, block_n, num_warps = _launch_config(Bt, H, P, N, x.is_cuda if on_gpu is None else on_gpu)
    z_arg = z if z is not None else x                       # never read when HAS_Z is False
    inter = intermediate_states if intermediate_states is not None else state_pool
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)
    i_strides = intermediate_states.stride() if intermediate_states is not None else (0, 0, 0, 0, 0)
    args = (state_pool, x, dt, A, B, C, D, dt_bias, slots, z_arg, y, inter,
            T, P, N, H // G, float(dt_min), float(dt_max),
            *state_pool.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *z_strides, *y.stride(),
            *i_strides, A.stride(0), D.stride(0), dt_bias.stride(0))
    meta = dict(DT_SOFTPLUS=bool(dt_softplus), HAS_Z=z is not None, HAS_INTER=intermediate_states is not None,
                BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps)
    return y, (Bt, H, triton.cdiv(P, block_p)), args, meta


def launch(*inputs):
    """Runs the kernel on the inputs of plugins/mamba2_state_update.py's op; returns y."""
    y, grid, args, meta = prepare(*inputs)
    if y.numel():
        _mamba2_state_update_kernel[grid](*args, **meta)
    return y
