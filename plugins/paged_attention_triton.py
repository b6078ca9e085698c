"""Triton kernel for plugins/paged_attention.py (imported only when the kernel runs: needs triton).

Flash-decoding over pages. A program owns one (row, KV head, block of query rows, split of the row's
pages): its query rows are the (token, query head) pairs of the T new tokens and the H/KV query heads that
read this KV head, so each K/V page is loaded once for all of them (GQA); it walks its split's pages up to
the last position its queries see with an online softmax and writes an unnormalized partial result, its
running max and its sum. The splits of a row are merged afterwards (log-sum-exp). With one split (SINGLE:
a launch whose grid already fills the GPU, and the TensorRT plugin, plugins/tensorrt_kernels.py) the program
normalizes and writes the output [B, T, H, Dh] itself: one launch, no merge, no scratch. The grid is fixed by the
block table's width (a CUDA graph replays it unchanged); a program whose pages lie past its row's length
loops zero times, so the work follows the real lengths. Decode (T=1: G query rows per program) and prefill
chunks (T*G rows in blocks of BLOCK_M) run the same kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2

MIN_PAGES_PER_SPLIT = 4  # below this a split's fixed cost outweighs what it adds in parallelism
INTERPRETER_SPLITS = 3  # several splits on CPU too, so that tests cover the merge


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, acc_ptr, m_ptr, l_ptr,
    T, G, M, KV, D, pages_per_split, scale,
    s_q_b, s_q_t, s_q_h, s_q_d,
    s_k_p, s_k_s, s_k_h, s_k_d,
    s_v_p, s_v_s, s_v_h, s_v_d,
    s_t_b, s_t_p,
    s_a_0, s_a_1, s_a_2, s_a_3,  # acc [B, KV, M, splits, (D)]; with SINGLE: out [B, T, H, (D)] (m, l unused)
    s_m_b, s_m_k, s_m_m,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
    IEEE: tl.constexpr, SINGLE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1) % KV
    m_block = tl.program_id(1) // KV
    split = tl.program_id(2)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    t = rows // G
    head = kvh * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * s_q_b + t[:, None] * s_q_t + head[:, None] * s_q_h + offs_d[None, :] * s_q_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    query_pos = seq_len - T + t  # [BLOCK_M]
    last_t = tl.minimum(T - 1, (m_block * BLOCK_M + BLOCK_M - 1) // G)
    seen = tl.minimum(seq_len, seq_len - T + last_t + 1)  # positions this block's queries see
    n_pages = (seen + PAGE - 1) // PAGE
    start = split * pages_per_split
    end = tl.minimum(start + pages_per_split, n_pages)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_s = tl.arange(0, PAGE)
    if FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    for j in range(start, end):
        page = tl.maximum(tl.load(table_ptr + b * s_t_b + j * s_t_p).to(tl.int64), 0)
        k = tl.load(k_ptr + page * s_k_p + offs_s[:, None] * s_k_s + kvh * s_k_h + offs_d[None, :] * s_k_d,
                    mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + page * s_v_p + offs_s[:, None] * s_v_s + kvh * s_v_h + offs_d[None, :] * s_v_d,
                    mask=d_ok[None, :], other=0.0)
        if FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, PAGE]
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        visible = ((j * PAGE + offs_s)[None, :] <= query_pos[:, None]) & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SINGLE:  # rows that saw nothing (padding rows) have l = 0 and give zeros
        out = b * s_a_0 + t[:, None] * s_a_1 + head[:, None] * s_a_2 + offs_d[None, :]
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(acc_ptr + out, acc.to(acc_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        out = b * s_a_0 + kvh * s_a_1 + rows[:, None] * s_a_2 + split * s_a_3 + offs_d[None, :]
        tl.store(acc_ptr + out, acc, mask=row_ok[:, None] & d_ok[None, :])
        stat = b * s_m_b + kvh * s_m_k + rows * s_m_m + split
        tl.store(m_ptr + stat, m_i, mask=row_ok)
        tl.store(l_ptr + stat, l_i, mask=row_ok)


def launch_config(batch: int, kv_heads: int, rows: int, width: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, splits): query rows per program (at least 16, tl.dot's minimum) and how many programs share
    one row's pages: enough programs for two waves on the GPU, never fewer than MIN_PAGES_PER_SPLIT pages each.
    Fixed by the shapes alone (batch, block-table width), so a captured graph keeps its grid."""
    block_m = min(64, max(16, next_power_of_2(rows)))
    programs = batch * kv_heads * triton.cdiv(rows, block_m)
    most = max(1, triton.cdiv(width, MIN_PAGES_PER_SPLIT))
    if device.type != "cuda":
        return block_m, min(INTERPRETER_SPLITS, width) or 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return block_m, max(1, min(most, triton.cdiv(target, programs)))


def merge(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Combine the splits: acc [B, KV, M, S, D] unnormalized, m and l [B, KV, M, S] -> [B, KV, M, D]."""
    top = m.amax(-1, keepdim=True)
    weight = torch.exp(m - top).nan_to_num(0.0)  # splits (and rows) that saw nothing weigh 0
    total = (l * weight).sum(-1, keepdim=True)
    return (acc * weight[..., None]).sum(-2) / torch.where(total > 0, total, 1.0)


def prepare(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale=None, v_scale=None, splits=None):
    """(outputs, grid, kernel args, kernel meta): the launch `launch` makes, for tools that compile it ahead of
    time. splits: programs per row's pages (default: launch_config's for q's device). With one split the kernel
    writes the result, outputs = (out [B, T, H, Dh],); else the partials to merge, outputs = (acc, m, l)."""
    B, T, H, D = q.shape
    page_size, KV = k_pages.shape[1], k_pages.shape[2]
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"plugins/paged_attention_triton.py: page_size={page_size} must be a power of two >= 16")
    G, width = H // KV, block_table.shape[1]
    M = T * G
    block_m, default_splits = launch_config(B, KV, M, width, q.device)
    splits = splits or default_splits
    if splits == 1:
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
        outputs, acc, m, l, stat_strides = (out,), out, out, out, (0, 0, 0)  # m, l never stored
    else:
        acc = torch.empty(B, KV, M, splits, D, dtype=torch.float32, device=q.device)
        m = torch.empty(B, KV, M, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        outputs, stat_strides = (acc, m, l), m.stride()[:3]
    fp8 = k_pages.dtype == torch.float8_e4m3fn
    scales = (k_scale, v_scale) if fp8 else (acc, acc)  # never read without FP8
    args = (q, k_pages, v_pages, block_table, seq_lens, *scales, acc, m, l,
            T, G, M, KV, D, triton.cdiv(width, splits), float(scale),
            *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *acc.stride()[:4],
            *stat_strides)
    meta = dict(PAGE=page_size, BLOCK_M=block_m, BLOCK_D=max(16, next_power_of_2(D)), FP8=fp8,
                IEEE=q.dtype == torch.float32, SINGLE=splits == 1, num_warps=4)
    return outputs, (B, KV * triton.cdiv(M, block_m), splits), args, meta


def launch(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale=None, v_scale=None):
    """Runs the kernel on the inputs of plugins/paged_attention.py's op; returns [B, T, H, Dh]."""
    B, T, H, D = q.shape
    outputs, grid, args, meta = prepare(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale, v_scale)
    if B and T:
        _paged_attention_kernel[grid](*args, **meta)
    if len(outputs) == 1:
        return outputs[0]
    KV = k_pages.shape[2]
    out = merge(*outputs).view(B, KV, T, H // KV, D).transpose(1, 2).reshape(B, T, H, D)
    return out.to(q.dtype)
