"""Causal GQA attention over a paged KV cache: decode steps, verifies and prefill chunks in one op.

K and V of every sequence live in pages of `page_size` tokens, `k_pages` / `v_pages` [num_pages, page_size,
KV, Dh]; row b's pages are block_table[b, 0], block_table[b, 1], ... (position p is slot p % page_size of
page block_table[b, p // page_size]). Row b has seq_lens[b] tokens, its T queries being the newest: query i
sits at position seq_lens[b] - T + i and sees the positions up to its own (no positional embedding).
Query head h reads KV head h // (H / KV); scores are scaled by `scale`, the softmax runs in fp32. The reference
runs eager decode and verify calls (few query rows per KV head) in the flash-decoding form of the Triton kernel:
splits of SPLIT_KEYS keys read page by page with an online softmax, so a long context is read once in
cache-sized blocks, never copied whole; prefill chunks and compiled steps gather the pages they read and call
torch's fused scaled_dot_product_attention (one graph of static size when compiled).

FP8 KV: pages of float8_e4m3fn hold K / k_scale and V / v_scale (fp32 scalars, ModelOpt's `k_scale` /
`v_scale`); they are read back as stored * scale.

Lengths are data: the block table has a static width, and the cost follows the real lengths. The Triton
kernel (paged_attention_triton.py) splits each row's pages among programs, flash-decoding style, and a
program past its row's length does nothing. The reference reads the first `max_pages` entries of every row
(a static bound a compiled step picks, engines/executors/compiled_step.py; by default the pages of the
longest row, which reads the lengths back to the host).

A row whose queries see nothing (seq_lens[b] == 0, a padding row) returns zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import eager_reference, use_triton

WHERE = "plugins/paged_attention.py"
FP8 = torch.float8_e4m3fn


SPLIT_KEYS = 1024  # eager decode: keys per split of the online softmax (a cache-sized block of K and V)
SPLIT_ROWS = 64  # eager calls with at most this many query rows per KV head (T x H/KV) run in splits


def paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale=None, v_scale=None,
                              max_pages=None):
    """Plain-torch specification (module docstring). Returns [B, T, H, Dh] in q.dtype."""
    B, T, H, Dh = q.shape
    page_size, KV = k_pages.shape[1], k_pages.shape[2]
    if max_pages is None:
        max_pages = -(-int(seq_lens.max()) // page_size) if B else 0
    table = block_table[:, :max_pages].clamp(min=0).long()  # [B, P]
    # query i of row b at position seq_lens[b] - T + i (a padding row's at 0: it sees one stale key, then is zeroed)
    query_pos = (seq_lens[:, None].long() - T + torch.arange(T, device=q.device)).clamp(min=0)  # [B, T]
    if torch.compiler.is_compiling() or T * (H // KV) > SPLIT_ROWS:
        k, v = _read(k_pages, table, k_scale, q.dtype), _read(v_pages, table, v_scale, q.dtype)
        out = _attend(q, k, v, query_pos, scale)
    else:
        out = _attend_in_splits(q, k_pages, v_pages, table, query_pos, scale, k_scale, v_scale)
    return torch.where((seq_lens > 0)[:, None, None, None], out, 0).to(q.dtype)


def _attend(q, k, v, query_pos, scale):
    """Torch's fused SDPA over every row's gathered K, V [B, L, KV, Dh]: query head h reads KV head h // (H/KV)."""
    visible = torch.arange(k.shape[1], device=q.device) <= query_pos[..., None]  # [B, T, L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _attend_in_splits(q, k_pages, v_pages, table, query_pos, scale, k_scale, v_scale):
    """The flash-decoding form the Triton kernel computes: each KV head's T x H/KV query rows walk the row's
    pages SPLIT_KEYS keys at a time with an online softmax in fp32, so K and V are read in cache-sized blocks
    and no copy of a whole row is made (what a decode step over a long context pays for otherwise)."""
    B, T, H, Dh = q.shape
    page_size, KV = k_pages.shape[1], k_pages.shape[2]
    G = H // KV
    rows = q.float().view(B, T, KV, G, Dh).transpose(1, 2).reshape(B, KV, T * G, Dh) * scale  # row t * G + g
    row_pos = query_pos.repeat_interleave(G, dim=1)[:, None, :, None]  # [B, 1, T * G, 1]
    top = torch.full((B, KV, T * G, 1), -torch.inf, device=q.device)  # running max, sum and unnormalized output
    total = torch.zeros_like(top)
    acc = torch.zeros(B, KV, T * G, Dh, device=q.device)
    per_split = max(1, SPLIT_KEYS // page_size)
    for first in range(0, table.shape[1], per_split):
        pages = table[:, first:first + per_split]
        k, v = _read(k_pages, pages, k_scale, torch.float32), _read(v_pages, pages, v_scale, torch.float32)
        keys = first * page_size + torch.arange(k.shape[1], device=q.device)
        scores = (rows @ k.permute(0, 2, 3, 1)).masked_fill(keys > row_pos, -torch.inf)  # [B, KV, T * G, keys]
        new_top = torch.maximum(top, scores.amax(-1, keepdim=True))  # finite: every row sees position 0
        probs, decay = torch.exp(scores - new_top), torch.exp(top - new_top)
        total = total * decay + probs.sum(-1, keepdim=True)
        acc = acc * decay + probs @ v.transpose(1, 2)
        top = new_top
    return (acc / total).view(B, KV, T, G, Dh).transpose(1, 2).reshape(B, T, H, Dh)


def _read(pages: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The pages of each row of table [B, P] as [B, P * page_size, KV, Dh] in `dtype`, FP8 pages dequantized."""
    B, P = table.shape
    x = pages.index_select(0, table.flatten()).view(B, P * pages.shape[1], *pages.shape[2:])
    return (x.float() * scale).to(dtype) if pages.dtype == FP8 else x.to(dtype)


def _check(q, k_pages, v_pages, block_table, seq_lens, k_scale, v_scale):
    if q.dim() != 4:
        raise ValueError(f"{WHERE}: q has shape {tuple(q.shape)}, expected [batch, tokens, heads, head_dim]")
    B, T, H, Dh = q.shape
    if k_pages.dim() != 4 or k_pages.shape[3] != Dh or H % k_pages.shape[2]:
        raise ValueError(f"{WHERE}: k_pages has shape {tuple(k_pages.shape)}, expected [pages, page_size, "
                         f"kv_heads dividing {H}, {Dh}]")
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"{WHERE}: v_pages {v_pages.dtype} {tuple(v_pages.shape)} does not match k_pages "
                         f"{k_pages.dtype} {tuple(k_pages.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.is_floating_point():
        raise ValueError(f"{WHERE}: block_table is {block_table.dtype} {tuple(block_table.shape)}, expected "
                         f"integer [{B}, pages per sequence]")
    if tuple(seq_lens.shape) != (B,) or seq_lens.is_floating_point():
        raise ValueError(f"{WHERE}: seq_lens is {seq_lens.dtype} {tuple(seq_lens.shape)}, expected integer [{B}]")
    if (k_pages.dtype == FP8) != (k_scale is not None and v_scale is not None):
        raise ValueError(f"{WHERE}: k_scale and v_scale are needed exactly when the pages are {FP8} "
                         f"(pages are {k_pages.dtype})")


@torch.library.custom_op("nemo3::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, k_scale: torch.Tensor | None,
                        v_scale: torch.Tensor | None, max_pages: int, impl: str) -> torch.Tensor:
    if use_triton(impl, q.device, WHERE):
        from .paged_attention_triton import launch
        return launch(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale, v_scale)
    return paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale, v_scale,
                                     max_pages if max_pages >= 0 else None)


@_paged_attention_op.register_fake
def _(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale, v_scale, max_pages, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_attention(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale=None, v_scale=None, max_pages=None,
                    *, impl=None):
    """Attention of q [B, T, H, Dh] over the pages of each row (module docstring), via `nemo3::paged_attention`.

    k_pages, v_pages [num_pages, page_size, KV, Dh] (q's dtype, or float8_e4m3fn with fp32 scalar k_scale and
    v_scale); block_table [B, P] int (entries past a row's length are not read; -1 allowed there); seq_lens [B]
    int, the T new tokens included. max_pages: the reference reads block_table[:, :max_pages] (>= the longest
    row's pages; None: found from seq_lens). Returns [B, T, H, Dh] in q.dtype. `impl`: "auto" | "triton" |
    "reference" (default: $NEMO3_KERNEL_IMPL or "auto", see plugins/dispatch.py).
    """
    _check(q, k_pages, v_pages, block_table, seq_lens, k_scale, v_scale)
    if eager_reference(impl, q.device, WHERE):
        return paged_attention_reference(q, k_pages, v_pages, block_table, seq_lens, scale, k_scale, v_scale,
                                         max_pages)
    return _paged_attention_op(q, k_pages, v_pages, block_table, seq_lens, float(scale), k_scale, v_scale,
                               -1 if max_pages is None else int(max_pages), impl or "")
