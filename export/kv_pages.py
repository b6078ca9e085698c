"""KV-cache pages: the one page accounting that the planner (export/planner.py) and the runtime share.

Every attention layer (MTP layers included) keeps K and V in pages of `page_size` tokens. A sequence of n
tokens holds `pages_for(n)` pages, the same page ids in every attention layer, listed in its block-table row;
its Mamba state (SSM state and conv window) is a fixed amount per sequence. So memory for sequences of up to
`context` tokens splits into `max_sequences` fixed states plus `max_sequences * pages_for(context)` pages:
the planner's "max concurrent sequences" is `page_budget(...).max_sequences`, and a runtime given the same
memory builds exactly that many slots and pages (engines/runtime/factory.py), so it admits what was planned.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PAGE_SIZE = 64  # tokens per page


def pages_for(tokens: int, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """Pages that hold `tokens` tokens."""
    return -(-int(tokens) // page_size)


@dataclass(frozen=True)
class SequenceState:
    """Bytes of one sequence's state: `fixed` (Mamba SSM state + conv windows, whatever its length) and
    `per_page` (K and V of one page in every attention layer)."""

    ssm: int
    conv: int
    per_page: int
    page_size: int = DEFAULT_PAGE_SIZE

    @property
    def fixed(self) -> int:
        return self.ssm + self.conv

    def kv_bytes(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size) * self.per_page

    def bytes(self, tokens: int) -> int:
        return self.fixed + self.kv_bytes(tokens)


@dataclass(frozen=True)
class PageBudget:
    max_sequences: int  # sequences of `context` tokens that fit at once
    num_pages: int  # KV pages: max_sequences * pages_per_sequence
    pages_per_sequence: int  # pages one sequence of `context` tokens holds


def page_budget(free_bytes: int, state: SequenceState, context: int) -> PageBudget:
    """How `free_bytes` of sequence memory splits into slots and pages for sequences of `context` tokens."""
    if context < 1:
        raise ValueError(f"context={context}: must be at least 1 token")
    per_sequence = pages_for(context, state.page_size)
    max_sequences = max(int(free_bytes), 0) // max(state.bytes(context), 1)
    return PageBudget(max_sequences, max_sequences * per_sequence, per_sequence)
