"""The executor interface: one forward over a token-major ragged batch.

Every executor (torch now, TensorRT engines later) sees exactly what an AOT engine sees: the new
tokens of all sequences packed one after another, where each sequence starts, how many tokens each
already has in its state slot, the slot, and which rows' next-token logits to return. The runtime
above it is the same for every executor.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    keep_steps: bool = False  # keep the Mamba state after every token, for `commit_steps` (speculation)

    @property
    def lengths(self) -> torch.Tensor:
        return self.query_start[1:] - self.query_start[:-1]

    @classmethod
    def build(cls, sequences: list[tuple[list[int], int, int]], logit_rows: list[int], keep_steps: bool = False):
        """From (new token ids, past length, slot) per sequence and rows into the packed tokens."""
        lengths = [len(tokens) for tokens, _, _ in sequences]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        return cls(token_ids=torch.tensor([t for tokens, _, _ in sequences for t in tokens], dtype=torch.long),
                   query_start=torch.tensor(starts, dtype=torch.long),
                   past_lengths=torch.tensor([p for _, p, _ in sequences], dtype=torch.long),
                   slots=torch.tensor([s for _, _, s in sequences], dtype=torch.long),
                   logit_rows=torch.tensor(logit_rows, dtype=torch.long), keep_steps=keep_steps)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [L, V] float32, for batch.logit_rows
    hidden: torch.Tensor  # [N, D]: the final (normalized) hidden state of every row, what MTP reads


class Executor(Protocol):
    spec: ModelSpec
    max_sequences: int
    max_length: int
    has_mtp: bool

    def forward(self, batch: RaggedBatch) -> ForwardOutput:
        """The backbone over the batch, updating each sequence's state slot."""

    def mtp_forward(self, batch: RaggedBatch, hidden: torch.Tensor) -> ForwardOutput:
        """The MTP step over MTP sequences: token_ids are x_{t+1}, hidden [N, D] is c_t; returns the logits
        for x_{t+2} and c' (the MTP's own output, fed back when drafting recursively)."""

    def commit_steps(self, slots: list[int], keep: list[int]) -> None:
        """After a `keep_steps` forward: set slot slots[i]'s Mamba state to the state after its token keep[i]."""

    def warm_up(self, max_tokens: int) -> None:
        """Prepare (compile, capture) whatever calls of up to `max_tokens` new tokens per sequence need, before
        the first request; a no-op for an executor with nothing to prepare."""

    def failure(self) -> str | None:
        """Why this executor can no longer run (a tensor-parallel rank exited or failed), one line; None while
        it can."""

    def close(self) -> None:
        """Free what the executor holds beyond memory: the worker processes of tensor-parallel ranks."""
