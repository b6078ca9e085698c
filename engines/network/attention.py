"""Grouped-query attention without positional embedding (the Mamba layers carry position).

Query head h reads key/value head h // (heads / kv_heads); scores are scaled by head_dim^-0.5 and
the softmax runs in fp32. With a KV cache, row b's new keys land at positions
past_lengths[b] .. past_lengths[b] + T - 1 of its slot's pages (engines/network/state.py) and its queries
see everything before, through plugins/paged_attention.py (the Triton kernel on GPU: its cost follows the
real lengths; the reference reads the pages of the batch's longest row, or a compiled step's static bound).
An FP8 cache (a state built with the layer in `fp8_kv`) stores K / k_scale and V / v_scale of the
quantized k_proj / v_proj, whose outputs are already rounded to what it holds. Quantized q/k/v projections
that quantize their common input alike (W8A8, W4A4: one format and scale) quantize it once for the three.

Tensor parallel: a rank holds a contiguous block of query heads and the KV heads they read (one
replicated KV head when the ranks outnumber the KV heads), so the same GQA mapping holds locally;
o_proj is row-parallel.
"""

from __future__ import annotations

import torch
from torch import nn

from ...export.spec import ModelSpec
from ...plugins.paged_attention import FP8, paged_attention
from ...plugins.pool_rows import write_rows
from .parallel import SINGLE, Parallel
from .quant_linear import fake_quantize_input, shared_input_quantizer
from .state import KVCache


class Attention(nn.Module):
    """x [B, T, D] -> [B, T, D]."""

    stateful = True

    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        D, Dh, bias = spec.hidden_size, spec.head_dim, spec.attention_bias
        self.heads = parallel.local(spec.num_attention_heads)
        self.kv_heads = parallel.kv_heads(spec.num_key_value_heads)
        self.head_dim, self.parallel = Dh, parallel
        self.q_proj = nn.Linear(D, self.heads * Dh, bias=bias)
        self.k_proj = nn.Linear(D, self.kv_heads * Dh, bias=bias)
        self.v_proj = nn.Linear(D, self.kv_heads * Dh, bias=bias)
        self.o_proj = nn.Linear(self.heads * Dh, D, bias=bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, slots: torch.Tensor | None = None,
                past_lengths: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        quantizer = shared_input_quantizer(projections)
        if quantizer is not None:
            x = fake_quantize_input(*quantizer, x)
        q, k, v = (projection(x, input_quantized=True) if quantizer else projection(x) for projection in projections)
        q = q.view(B, T, self.heads, self.head_dim)
        k, v = k.view(B, T, self.kv_heads, self.head_dim), v.view(B, T, self.kv_heads, self.head_dim)
        scale = self.head_dim ** -0.5
        if cache is None:
            out = attend(q, k, v, torch.zeros(B, dtype=torch.long, device=x.device), scale)
        else:
            scales = (self.k_proj.k_scale, self.v_proj.v_scale) if cache.k.dtype == FP8 else (None, None)
            store_in_pages(cache, k, v, slots, past_lengths, *scales, lengths=lengths)
            seq_lens = torch.where(slots >= 0, past_lengths + T, 0)  # padding rows see nothing
            # compiled: a static bound on the pages read per row (none set: the whole block table)
            bound = (cache.pages.bound or cache.pages.table.shape[1]) if torch.compiler.is_compiling() else None
            out = paged_attention(q, cache.k, cache.v, cache.pages.table[slots.clamp(min=0)], seq_lens, scale,
                                  *scales, max_pages=bound)
        return self.parallel.row_parallel(self.o_proj, out.flatten(2))


def store_in_pages(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, past_lengths: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                   lengths: torch.Tensor | None = None) -> None:
    """Store the new k, v [B, T, kv, Dh] of each row at positions past .. past+T-1 of its slot's pages (FP8 pages:
    divided by their scale). Padding rows (slot < 0), positions without a page and, with `lengths` [B], a row's
    positions past its real tokens store nothing. Static shapes."""
    B, T = k.shape[:2]
    page_size, width = cache.pages.page_size, cache.pages.table.shape[1]
    positions = past_lengths[:, None] + torch.arange(T, device=k.device)  # [B, T]
    entry = positions // page_size
    page = cache.pages.table[slots.clamp(min=0)[:, None], entry.clamp(max=width - 1)].long()  # [B, T]
    real = (slots[:, None] >= 0) & (entry < width) & (page >= 0)
    if lengths is not None:
        real &= positions < (past_lengths + lengths)[:, None]
    index = torch.where(real, page * page_size + positions % page_size, -1).flatten()
    if k_scale is not None:
        k, v = k.float() / k_scale, v.float() / v_scale
    write_rows(cache.k.view(-1, *cache.k.shape[2:]), index, k.flatten(0, 1))
    write_rows(cache.v.view(-1, *cache.v.shape[2:]), index, v.flatten(0, 1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA. q [B, T, H, Dh]; k, v [B, L, KV, Dh] with query i of row b at position past_lengths[b] + i.
    Returns [B, T, H, Dh]."""
    T, H = q.shape[1:3]
    L, KV = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bthd,blhd->bhtl", q, k) * scale
    query_pos = past_lengths[:, None] + torch.arange(T, device=q.device)  # [B, T]
    visible = torch.arange(L, device=q.device) <= query_pos[..., None]  # [B, T, L]
    scores = scores.masked_fill(~visible[:, None], -torch.inf)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhtl,blhd->bthd", probs, v)
