"""Grouped-query attention without positional embedding (the Mamba layers carry position).

Query head h reads key/value head h // (heads / kv_heads); scores are scaled by head_dim^-0.5 and
the softmax runs in fp32. With a KV cache, row b's new keys land at positions
past_lengths[b] .. past_lengths[b] + T - 1 of its slot and its queries see everything before.

Tensor parallel: a rank holds a contiguous block of query heads and the KV heads they read (one
replicated KV head when the ranks outnumber the KV heads), so the same GQA mapping holds locally;
o_proj is row-parallel.
"""

from __future__ import annotations

import torch
from torch import nn

from ...export.spec import ModelSpec
from ...plugins.pool_rows import write_rows
from .parallel import SINGLE, Parallel
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
                past_lengths: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        if cache is None:
            past_lengths = torch.zeros(B, dtype=torch.long, device=x.device)
        else:
            k, v = append_to_cache(cache, k, v, slots, past_lengths)
        out = attend(q, k, v, past_lengths, self.head_dim ** -0.5)
        return self.parallel.row_parallel(self.o_proj, out.flatten(2))


def append_to_cache(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                    past_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the new k, v [B, T, kv, Dh] of each row at positions past .. past+T-1 of its slot (padding rows,
    slot < 0, store nothing); return every row's keys and values so far, [B, L, kv, Dh], positions past a
    row's own length being stale (to be masked). L is max(past) + T, or the whole slot in a compiled step,
    whose shapes cannot depend on the data."""
    B, T = k.shape[:2]
    max_length = cache.k.shape[1]
    positions = past_lengths[:, None] + torch.arange(T, device=k.device)  # [B, T]
    index = torch.where(slots[:, None] >= 0, slots[:, None] * max_length + positions, -1).flatten()
    write_rows(cache.k.view(-1, *cache.k.shape[2:]), index, k.flatten(0, 1))
    write_rows(cache.v.view(-1, *cache.v.shape[2:]), index, v.flatten(0, 1))
    length = max_length if torch.compiler.is_compiling() else int(past_lengths.max()) + T
    rows = slots.clamp(min=0)
    return cache.k[rows, :length].to(k.dtype), cache.v[rows, :length].to(v.dtype)


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
