"""Per-sequence inference state: slot-indexed pools shared by prefill and decode.

A slot holds one sequence's state. For every Mamba-2 layer: the conv window (the last K-1 inputs
of the depthwise conv, oldest first) and the SSM state (float32 by default). For every attention
layer: K and V in pages of `page_size` tokens (export/kv_pages.py), found through the slot's row of one
block table that every attention layer shares (the same page ids in each layer's pool). Built without
`num_pages`, slot s owns pages s * P .. s * P + P - 1 (P = the pages of max_length tokens), as much as a
dense cache; built with `num_pages`, the block table starts empty and the runtime maps pages to slots as
sequences grow (`map_pages`, engines/runtime/pages.py). MTP layers have their own entries. Pools are keyed
by the layer's module path (`backbone.layers.3`, `mtp.layers.0`). The layers named in `fp8_kv` keep
float8_e4m3fn pages (K / k_scale, V / v_scale, the scales of their quantized k_proj / v_proj).

A forward with `past_lengths[b] == 0` starts a fresh sequence in `slots[b]` (its old state is
ignored and overwritten); `slots[b] < 0` marks a padding row whose state is never touched.

A tensor-parallel rank's pools hold its own Mamba heads and channels and its KV heads
(engines/parallel.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ...export.kv_pages import DEFAULT_PAGE_SIZE, pages_for
from ...export.names import mtp_layer_count
from ...export.spec import ATTENTION, MAMBA, ModelSpec
from ...plugins.pool_rows import write_rows
from .parallel import SINGLE, Parallel


@dataclass
class MambaState:
    conv: torch.Tensor  # [S, conv_dim, K-1], activation dtype
    ssm: torch.Tensor  # [S, H, P, N], float32 unless the spec says otherwise
    # while recording (speculative verify): per decode call, (slots [B], conv after each token
    # [B, T, conv_dim, K-1], ssm after each token [B, T, H, P, N])
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = field(default=None)


@dataclass
class PageTable:
    """Where each slot's K and V live (one for all attention layers)."""

    table: torch.Tensor  # [S, pages per sequence] int32 page ids, -1: no page
    page_size: int
    # the pages per row a compiled step's reference reads (a static bucket, compiled_step.py); None: the batch's own
    bound: int | None = None


@dataclass
class KVCache:
    k: torch.Tensor  # [num_pages, page_size, kv_heads, head_dim]
    v: torch.Tensor  # [num_pages, page_size, kv_heads, head_dim]
    pages: PageTable  # shared by every attention layer of the state


class InferenceState:
    """State pools for `max_sequences` concurrent sequences of up to `max_length` tokens, their K and V in
    `num_pages` pages (default: enough for every slot at max_length, mapped slot by slot)."""

    def __init__(self, spec: ModelSpec, max_sequences: int, max_length: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", mtp: bool = True, parallel: Parallel = SINGLE,
                 num_pages: int | None = None, page_size: int = DEFAULT_PAGE_SIZE, fp8_kv: frozenset[str] = frozenset()):
        if max_sequences <= 0 or max_length <= 0 or page_size <= 0 or (num_pages is not None and num_pages <= 0):
            raise ValueError(f"InferenceState: max_sequences={max_sequences}, max_length={max_length}, "
                             f"page_size={page_size} and num_pages={num_pages} must be positive")
        self.spec, self.max_sequences, self.max_length = spec, max_sequences, max_length
        per_sequence = pages_for(max_length, page_size)
        if num_pages is None:  # every slot owns its own run of pages
            num_pages = max_sequences * per_sequence
            table = torch.arange(num_pages, dtype=torch.int32, device=device).view(max_sequences, per_sequence)
        else:
            table = torch.full((max_sequences, per_sequence), -1, dtype=torch.int32, device=device)
        self.num_pages, self.pages = num_pages, PageTable(table, page_size)
        ssm_dtype = getattr(torch, spec.mamba_ssm_cache_dtype)
        self.layers: dict[str, MambaState | KVCache] = {}
        for key, letter in layer_keys(spec, mtp):
            if letter == MAMBA:
                heads, conv_dim = parallel.local(spec.mamba_num_heads), parallel.local(spec.conv_dim)
                self.layers[key] = MambaState(
                    conv=torch.zeros(max_sequences, conv_dim, spec.conv_kernel - 1, dtype=dtype, device=device),
                    ssm=torch.zeros(max_sequences, heads, spec.mamba_head_dim, spec.ssm_state_size,
                                    dtype=ssm_dtype, device=device))
            elif letter == ATTENTION:
                shape = (num_pages, page_size, parallel.kv_heads(spec.num_key_value_heads), spec.head_dim)
                kv_dtype = torch.float8_e4m3fn if key in fp8_kv else dtype
                self.layers[key] = KVCache(k=torch.zeros(shape, dtype=kv_dtype, device=device),
                                           v=torch.zeros(shape, dtype=kv_dtype, device=device), pages=self.pages)

    def __getitem__(self, key: str) -> MambaState | KVCache:
        if key not in self.layers:
            raise KeyError(f"InferenceState has no pool for layer {key!r} (built with mtp=False?)")
        return self.layers[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.layers.values() for t in vars(entry).values()
                   if isinstance(t, torch.Tensor))

    def map_pages(self, slot: int, first: int, pages: list[int]) -> None:
        """Block-table entries first .. first + len(pages) - 1 of `slot` become `pages`; from first 0 (a new
        occupant), the rest of the slot's row is cleared, so that no write lands in another sequence's pages."""
        row = self.pages.table[slot]
        if first == 0:
            row.fill_(-1)
        if pages:
            row[first:first + len(pages)] = torch.tensor(pages, dtype=row.dtype, device=row.device)

    def reset_fresh(self, slots: torch.Tensor, past_lengths: torch.Tensor, prefix: str = "backbone.") -> None:
        """Zero the Mamba states, of the layers whose key starts with `prefix` (the backbone's, or the MTP's:
        "mtp."), of the rows that start a sequence (past 0, slot >= 0): decode continues a slot's state, so
        a sequence that starts with a decode call must find zeros there. (Not traceable: compiled steps
        only continue sequences, engines/executor.py.)"""
        fresh = slots[(past_lengths == 0) & (slots >= 0)]
        if len(fresh):
            for key, entry in self.layers.items():
                if key.startswith(prefix) and isinstance(entry, MambaState):
                    entry.conv[fresh] = 0
                    entry.ssm[fresh] = 0

    def mamba_layers(self) -> list[MambaState]:
        return [entry for entry in self.layers.values() if isinstance(entry, MambaState)]

    @contextlib.contextmanager
    def recording_steps(self, enabled: bool = True):
        """Within: decode calls keep every Mamba layer's state after each of their tokens, so that
        `keep_recorded` can roll a slot back to the state after its last accepted draft token."""
        if not enabled:
            yield
            return
        for entry in self.mamba_layers():
            entry.steps = []
        try:
            yield
        finally:
            for entry in self.mamba_layers():
                entry.steps = None

    def keep_recorded(self, index: torch.Tensor) -> None:
        """The in-graph rollback of a speculative step, inside `recording_steps` after its one decode call: set
        each row's Mamba states (conv window and SSM state) to those after its token index[b] [B], with static
        shapes and no host reads (padding rows, slot < 0, write nothing)."""
        for entry in self.mamba_layers():
            slots, conv, ssm = entry.steps[-1]
            rows = torch.arange(len(index), device=index.device)
            write_rows(entry.conv, slots, conv[rows, index])
            write_rows(entry.ssm, slots, ssm[rows, index])


def layer_keys(spec: ModelSpec, mtp: bool = True) -> list[tuple[str, str]]:
    """(module path, layer letter) of every layer, backbone first, then MTP layers if `mtp`."""
    keys = [(f"backbone.layers.{i}", letter) for i, letter in enumerate(spec.layer_types)]
    if mtp:
        steps = len(spec.mtp_layer_types)
        keys += [(f"mtp.layers.{j}", spec.mtp_layer_types[j % steps]) for j in range(mtp_layer_count(spec))]
    return keys
