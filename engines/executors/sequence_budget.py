"""How many sequences and KV pages a rank's state pools get from a byte budget: the planner's accounting.

`nemo3 plan` gives each rank "free for sequences" bytes; a runtime given the same bytes per rank
(`StackOptions.state_memory`) sizes its pools with `sequence_budget`, which splits them by
export/planner.py's `sequence_state` for the model's tensor-parallel layout (each rank's share of the Mamba
heads and channels, its KV heads or one replicated head), so it admits what was planned. Every rank of a
tensor-parallel model holds the same amount per sequence, so each rank, leader and workers alike, computes
the same slots and pages from its own rank's model.
"""

from __future__ import annotations

import torch

from ...export.kv_pages import page_budget
from ...export.planner import sequence_state

KV_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}  # planner's names


def sequence_budget(model, max_sequences: int, max_length: int, state_memory: int | None) -> tuple[int, int | None]:
    """(max_sequences, KV pages) of `model`'s (a whole model's or one rank's) state: `state_memory` bytes split
    by the planner's accounting into sequences of `max_length` tokens, or, without a budget, `max_sequences`
    slots of max_length tokens (None: the executor's default pages)."""
    if state_memory is None:
        return max_sequences, None
    kv = torch.float8_e4m3fn if model.fp8_kv_layers() else model.dtype
    if kv not in KV_DTYPE_NAMES or model.dtype not in KV_DTYPE_NAMES:
        raise ValueError(f"state_memory: no page accounting for {kv} KV pages of a {model.dtype} model")
    state = sequence_state(model.spec, model.parallel.world_size, KV_DTYPE_NAMES[kv], conv_bytes=model.dtype.itemsize)
    budget = page_budget(state_memory, state, max_length)
    if budget.max_sequences < 1:
        raise ValueError(f"state_memory={state_memory}: one sequence of max_length={max_length} tokens needs "
                         f"{state.bytes(max_length)} bytes per rank")
    return budget.max_sequences, budget.num_pages
