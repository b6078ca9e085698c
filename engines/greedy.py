"""Greedy decoding of one sequence with a state: what each rank of `nemo3 run --tp N` does.

The request-level runtime (engines/runtime.py) is single-process for now: over tensor-parallel
ranks every rank would have to take the same scheduling and sampling decisions. Greedy decoding of
one sequence needs no agreement: the all-gathered logits, hence their argmax, are the same on every
rank, so every rank feeds the same token to the next step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model import Model


@torch.inference_mode()
def greedy_tokens(model: Model, prompt: list[int], max_tokens: int,
                  stop_ids: set[int] | frozenset[int] = frozenset()) -> Iterator[int]:
    """Yield up to `max_tokens` argmax tokens after `prompt`, stopping after one of `stop_ids`:
    one prefill of the prompt, then one decode step per token."""
    if not prompt:
        raise ValueError("greedy_tokens: the prompt is empty")
    device = model.device
    state = model.new_state(max_sequences=1, max_length=len(prompt) + max_tokens, mtp=False)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    ids, past = torch.tensor([prompt], device=device), 0
    for _ in range(max_tokens):
        hidden = model(ids, state, slot, torch.tensor([past], device=device))[:, -1]
        token = int(model.lm_head(model.final_hidden(hidden)).argmax(-1))
        yield token
        if token in stop_ids:
            return
        past += ids.shape[1]
        ids = torch.tensor([[token]], device=device)
