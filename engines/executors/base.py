"""The executor interface: one forward over a token-major ragged batch.

Every executor (torch now, TensorRT engines later) sees exactly what an AOT engine sees: the new
tokens of all sequences packed one after another, where each sequence starts, how many tokens each
already has in its state slot, the slot, and which rows' next-token logits to return. The runtime
above it is the same for every executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ...export.spec import ModelSpec


@dataclass
class RaggedBatch:
    token_ids: torch.Tensor  # [N] int64: every sequence's new tokens, packed sequence after sequence
    query_start: torch.Tensor  # [S+1] int64: sequence s owns rows query_start[s] : query_start[s+1]
    past_lengths: torch.Tensor  # [S] int64: tokens already in the sequence's slot (0: a new sequence)
    slots: torch.Tensor  # [S] int64: state slot of each sequence
    logit_rows: torch.Tensor  # [L] int64: rows whose next-token logits are returned
    # KV pages mapped before the forward: (slot, first block-table entry, page ids); from entry 0 the slot's row is
    # cleared first (a new occupant). The runtime's page accounting (engines/runtime/pages.py) fills it.
    pages: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def lengths(self) -> torch.Tensor:
        return self.query_start[1:] - self.query_start[:-1]

    @classmethod
    def build(cls, sequences: list[tuple[list[int], int, int]], logit_rows: list[int],
              pages: list[tuple[int, int, list[int]]] | None = None):
        """From (new token ids, past length, slot) per sequence, rows into the packed tokens, and page updates."""
        lengths = [len(tokens) for tokens, _, _ in sequences]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        return cls(token_ids=torch.tensor([t for tokens, _, _ in sequences for t in tokens], dtype=torch.long),
                   query_start=torch.tensor(starts, dtype=torch.long),
                   past_lengths=torch.tensor([p for _, p, _ in sequences], dtype=torch.long),
                   slots=torch.tensor([s for _, _, s in sequences], dtype=torch.long),
                   logit_rows=torch.tensor(logit_rows, dtype=torch.long), pages=pages or [])


@dataclass
class SpeculativeBatch:
    """One MTP speculative step over the decoding sequences (engines/executors/compiled_step.py,
    `speculative_step`): every row verifies its drafts, keeps what it accepts and drafts K new tokens."""

    token_ids: torch.Tensor  # [B, K+1] int64: each sequence's last token, then its drafts, right-padded with 0
    num_drafts: torch.Tensor  # [B] int64: real drafts per row (0: a plain decode row)
    past_lengths: torch.Tensor  # [B] int64 (> 0)
    slots: torch.Tensor  # [B] int64
    temperature: torch.Tensor  # [B] float32 (0: greedy)
    top_k: torch.Tensor  # [B] int64 (0: no limit)
    top_p: torch.Tensor  # [B] float32
    uniforms: torch.Tensor | None  # [B, 2K+1] float32 from each request's generator; None: every row greedy
    banned: torch.Tensor | None = None  # [P, 3] int64: (row, position, token id) never chosen (min_tokens)
    # KV pages mapped before the step, as RaggedBatch.pages: the step writes K+1 backbone and MTP positions per row
    pages: list[tuple[int, int, list[int]]] = field(default_factory=list)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [L, V] float32, for batch.logit_rows
    hidden: torch.Tensor  # [N, D]: the final (normalized) hidden state of every row, what MTP reads


class Executor(Protocol):
    spec: ModelSpec
    max_sequences: int
    max_length: int
    num_pages: int  # KV pages of page_size tokens (export/kv_pages.py)
    page_size: int
    has_mtp: bool

    def forward(self, batch: RaggedBatch) -> ForwardOutput:
        """The backbone over the batch, updating each sequence's state slot."""

    def mtp_forward(self, batch: RaggedBatch, hidden: torch.Tensor) -> ForwardOutput:
        """The MTP step over MTP sequences: token_ids are x_{t+1}, hidden [N, D] is c_t; returns the logits
        for x_{t+2} and c' (the MTP's own output). The runtime calls it over a prompt; `speculate` drafts."""

    def speculate(self, batch: SpeculativeBatch) -> list[list[int]]:
        """One speculative step in one call; per row [accepted (-1: its sampling distribution is not finite), the
        token after the accepted drafts, K new drafts], read back to the host at once."""

    def warm_up(self, max_tokens: int) -> None:
        """Prepare (compile, capture) whatever calls of up to `max_tokens` new tokens per sequence need, before
        the first request; a no-op for an executor with nothing to prepare."""

    def failure(self) -> str | None:
        """Why this executor can no longer run (a tensor-parallel rank exited or failed), one line; None while
        it can."""

    def close(self) -> None:
        """Free what the executor holds beyond memory: the worker processes of tensor-parallel ranks."""
