"""MTP speculative decoding: which drafted tokens a verify forward accepts.

The verify forward runs the backbone over [last token, y_0 .. y_{k-1}] and yields the target
distributions p_0 .. p_k (p_i is the distribution of the token after input i). Greedy: y_i is
accepted while it equals argmax p_i; the first mismatch is replaced by argmax p_i, and when every
draft is accepted argmax p_k is a bonus token. So greedy output is exactly that of plain greedy
decoding. Sampling: standard speculative (rejection) sampling, accept y_i with probability
min(1, p_i(y_i) / q_i(y_i)) where q_i is the draft distribution y_i was sampled from; on rejection
sample from normalize(max(p_i - q_i, 0)). The emitted tokens are then distributed exactly as
sampling from the target model token by token.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, distribution, sample


def accept(drafts: list[int], draft_probs: list[torch.Tensor] | None, target_logits: torch.Tensor,
           target_argmax: list[int], params: SamplingParams, generator: torch.Generator | None
           ) -> tuple[list[int], int]:
    """drafts y_0..y_{k-1}, their draft distributions q_i [V] (None when greedy), target logits [k+1, V] and
    their argmax (what greedy verification compares; the runtime reads all rows' argmax back at once).

    Returns (emitted tokens: the accepted drafts plus one corrected or bonus token, number accepted).
    """
    if params.greedy:
        for i, y in enumerate(drafts):
            if target_argmax[i] != y:
                return drafts[:i] + [target_argmax[i]], i
        return drafts + [target_argmax[len(drafts)]], len(drafts)
    targets = distribution(target_logits, params)  # [k+1, V]
    emitted: list[int] = []
    for i, y in enumerate(drafts):
        p, q = targets[i], draft_probs[i]
        ratio = float(p[y] / q[y]) if q[y] > 0 else 0.0
        if float(torch.rand((), generator=generator)) >= min(1.0, ratio):
            residual = (p - q).clamp(min=0)
            total = residual.sum()
            emitted.append(sample(residual / total if total > 0 else p, generator))
            return emitted, i
        emitted.append(y)
    emitted.append(sample(targets[len(drafts)], generator))
    return emitted, len(drafts)


def draft(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
          ) -> tuple[int, torch.Tensor]:
    """One sampled draft token from the MTP logits [V] and the distribution it was drawn from (greedy drafts
    are the argmax, which the runtime reads back for all rows at once)."""
    q = distribution(logits, params)
    return sample(q, generator), q
