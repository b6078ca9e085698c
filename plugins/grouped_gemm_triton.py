"""Triton kernel for plugins/nvfp4_linear.py and plugins/moe_experts.py (imported only when it runs: needs triton).

One GEMM `out[r] = x[r] @ W_e^T` (optionally relu(.)^2) where row r of x uses expert e = row_expert[r]'s weight
(a plain linear layer is one expert). The weight is either BF16/FP16 [E, N, K] or NVFP4: packed E2M1 codes
uint8 [E, N, K/2] (element 2j in the low nibble), E4M3 block scales [E, N, K/16] (read as their bytes) and an
fp32 global scale per expert. NVFP4 weights are decoded in registers, tile by tile, into x's dtype (E2M1 value
times block scale is exact in bf16), multiplied on the tensor cores (`tl.dot`, fp32 accumulation), and the
global scale applied to the accumulator: W4A16, with no dequantized copy of the weight in memory.

Grouped rows: the rows are ordered by expert (a stable sort, on the device), each expert's rows cut into tiles
of BLOCK_M; the grid has the static upper bound cdiv(rows, BLOCK_M) + experts tiles, and a tile past the last
real one does nothing. Rows of expert -1 (padding) belong to no tile: their output rows stay zero. Everything
is computed on the device with static shapes (no host reads), so the op captures in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreter_enabled, next_power_of_2


@triton.jit
def _e2m1_value(code):
    """E2M1 codes (int32 0..15: sign << 3 | magnitude index) -> fp32 values {0, .5, 1, 1.5, 2, 3, 4, 6}, signed."""
    exponent = (code >> 1) & 3
    half = (code & 1).to(tl.float32) * 0.5
    power = tl.where(exponent == 3, 4.0, tl.where(exponent == 2, 2.0, 1.0))
    magnitude = tl.where(exponent == 0, half, (1.0 + half) * power)
    return tl.where(code >= 8, -magnitude, magnitude)


@triton.jit
def _e4m3_value(byte):
    """float8_e4m3fn bytes (int32 0..255) -> fp32, exactly (the fp32 bit pattern is assembled from the fields)."""
    exponent = (byte >> 3) & 15
    mantissa = byte & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # subnormals: m * 2**-9
    return tl.where((byte & 128) != 0, -value, value)


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, global_ptr, out_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    rows, N, K, E,
    s_xm, s_xk, s_we, s_wn, s_wk, s_se, s_sn, s_sk, s_om, s_on,
    GROUPED: tl.constexpr, NVFP4: tl.constexpr, RELU2: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        expert = tl.load(tile_expert_ptr + tile)
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
    else:
        expert = tile * 0
        start = tile * BLOCK_M
        end = rows
    if expert < E:
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        if GROUPED:
            row = tl.load(order_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        else:
            row = offs_m.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w_base = w_ptr + expert.to(tl.int64) * s_we + offs_n[:, None].to(tl.int64) * s_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + row[:, None] * s_xm + offs_k[None, :] * s_xk,
                        mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            if NVFP4:
                offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_base + offs_b[None, :] * s_wk, mask=n_ok[:, None] & (offs_b < K // 2)[None, :],
                                 other=0).to(tl.int32)
                values = tl.join(_e2m1_value(packed & 15), _e2m1_value(packed >> 4))  # [BN, BK/2, 2]
                offs_s = k0 // 16 + tl.arange(0, BLOCK_K // 16)
                scales = tl.load(scale_ptr + expert.to(tl.int64) * s_se + offs_n[:, None].to(tl.int64) * s_sn
                                 + offs_s[None, :] * s_sk, mask=n_ok[:, None] & (offs_s < K // 16)[None, :],
                                 other=0).to(tl.int32)
                w = tl.reshape(values, (BLOCK_N, BLOCK_K // 16, 16)) * _e4m3_value(scales)[:, :, None]
                w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(a.dtype)
            else:
                w = tl.load(w_base + offs_k[None, :] * s_wk, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)
                w = w.to(a.dtype)
            if UPCAST:  # Triton's interpreter multiplies 16-bit floats wrongly: same products, in fp32
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
        if NVFP4:
            acc = acc * tl.load(global_ptr + expert)
        if RELU2:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        tl.store(out_ptr + row[:, None] * s_om + offs_n[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def tile_map(row_expert: torch.Tensor, n_experts: int, block_m: int):
    """Rows ordered by expert and the tiles over them, with static shapes: (order [R], tile_expert [T],
    tile_start [T], tile_end [T]) for T = cdiv(R, block_m) + n_experts; tile_expert = n_experts marks an idle
    tile. Rows of expert < 0 sort last and belong to no tile."""
    R = row_expert.shape[0]
    key = torch.where(row_expert < 0, n_experts, row_expert).long()
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=key.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:n_experts]  # (bincount reads its max on the host)
    first_row = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    last_tile = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(R, block_m) + n_experts, device=row_expert.device)
    expert = torch.searchsorted(last_tile, t, right=True)
    e = expert.clamp(max=n_experts - 1)
    start = first_row[e] + (t - (last_tile[e] - tiles[e])) * block_m
    return order, expert, start, first_row[e] + counts[e]


def launch(x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor | None, global_scale: torch.Tensor | None,
           row_expert: torch.Tensor | None, relu2: bool, out: torch.Tensor) -> torch.Tensor:
    """out [R, N] = (relu^2 of) x [R, K] @ W_{row_expert}^T; W BF16 [E, N, K] or NVFP4 packed [E, N, K/2] with
    block_scale [E, N, K/16] and global_scale [E]. row_expert None: one expert for every row. `out` is written
    only where a row has an expert (zeros elsewhere are the caller's)."""
    R, K = x.shape
    E, N = weight.shape[:2]
    nvfp4 = block_scale is not None
    block_m = 16 if R <= 16 else 32 if R <= 512 else 64
    block_n = min(128, max(32, next_power_of_2(N)))
    block_k = 64 if K >= 64 else max(32, next_power_of_2(K))
    dummy = x.new_empty(1, dtype=torch.int32)
    if row_expert is None:
        order = tile_expert = tile_start = tile_end = dummy
        tiles = triton.cdiv(R, block_m)
    else:
        order, tile_expert, tile_start, tile_end = tile_map(row_expert, E, block_m)
        tiles = tile_expert.shape[0]
    scales = block_scale.view(torch.uint8) if nvfp4 else dummy
    s_scale = scales.stride() if nvfp4 else (0, 0, 0)
    grid = (tiles, triton.cdiv(N, block_n))
    _grouped_gemm_kernel[grid](
        x, weight, scales, global_scale if nvfp4 else dummy, out, order, tile_expert, tile_start, tile_end,
        R, N, K, E,
        x.stride(0), x.stride(1), *weight.stride(), *s_scale, out.stride(0), out.stride(1),
        GROUPED=row_expert is not None, NVFP4=nvfp4, RELU2=relu2,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=interpreter_enabled(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
