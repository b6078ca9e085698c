"""Choosing tokens from logits with static shapes and no host reads, so that it runs inside a compiled step.

Per-row sampling parameters are tensors: temperature [B] (0: greedy), top_k [B] (0: no limit), top_p [B].
Random choices read uniforms in [0, 1) that the caller draws from each request's seeded generator, so a
request's samples depend on its seed only, wherever the choice runs.

Speculative acceptance (MTP): the verify call scores [last token, y_0 .. y_{k-1}] and yields the target
distributions p_0 .. p_k (p_i: the token after input i). Draft y_i, drawn from q_i, is accepted with
probability min(1, p_i(y_i) / q_i(y_i)), tested as u_i * q_i(y_i) < p_i(y_i); at the first rejection the
next token is drawn from normalize(max(p_i - q_i, 0)), and when all k are accepted from p_k (the bonus
token). The emitted tokens are then distributed as sampling from the target token by token. Greedy rows
accept while y_i == argmax p_i and emit argmax p_a: exactly plain greedy decoding.
"""

from __future__ import annotations

import torch


def distributions(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                  ) -> torch.Tensor:
    """logits [B, ..., V] -> probabilities [B, ..., V] (fp32) after temperature, top-k (ties kept) and top-p
    (tokens whose strictly more likely tokens already hold top_p are dropped); one-hot argmax (lowest id on
    ties) for rows of temperature 0."""
    logits = logits.float()
    V = logits.shape[-1]

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (logits.dim() - 1)))

    greedy = per_row(temperature == 0)
    scaled = logits / per_row(torch.where(temperature == 0, 1.0, temperature.float()))
    ordered = scaled.sort(-1, descending=True).values
    k = per_row(torch.where(top_k > 0, top_k, V).clamp(max=V) - 1).expand(*logits.shape[:-1], 1)
    kth = ordered.gather(-1, k)
    sorted_probs = ordered.masked_fill(ordered < kth, float("-inf")).softmax(-1)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked before each rank
    # top-p keeps the ranks whose predecessors hold less than top_p: a floor on the logits (compared in logit
    # space, whose values the sort copies exactly; the softmax of a permuted row may round differently)
    floor = ordered.masked_fill(before >= per_row(top_p.float()), float("inf")).amin(-1, keepdim=True)
    probs = scaled.masked_fill(scaled < torch.maximum(kth, floor), float("-inf")).softmax(-1)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    return torch.where(greedy, one_hot, probs)


def sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V] (unnormalized is fine), uniform [...] in [0, 1) -> token ids [...]
    (a one-hot distribution gives its token for any uniform)."""
    cdf = probs.float().cumsum(-1)
    return (cdf <= uniform[..., None] * cdf[..., -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] int: how many of each row's first entries are all True (a cumsum of the False ones, not a
    cumprod: ONNX has no cumulative product)."""
    return ((~mask).int().cumsum(-1) == 0).sum(-1)


def accept_drafts(target: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor,
                  greedy: torch.Tensor, draft_probs: torch.Tensor | None, uniforms: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify the drafts of every row at once.

    target [B, K+1, V]: the target distributions p_0..p_K (`distributions` of the verify logits); drafts
    [B, K] (row b's first num_drafts[b] are real); greedy [B] bool; draft_probs [B, K, V]: the q_i the
    drafts were drawn from, and uniforms [B, K+1] (acceptance tests, then the final draw): both None when
    every row is greedy. Returns (accepted [B] in 0..num_drafts, the token after them [B])."""
    K = drafts.shape[1]
    real = torch.arange(K, device=drafts.device) < num_drafts[:, None]
    best = target.argmax(-1)  # [B, K+1]
    match = best[:, :K] == drafts
    if draft_probs is None:
        accepted = leading_true(match & real)
        return accepted, best.gather(1, accepted[:, None].long())[:, 0]
    p_y = target[:, :K].gather(-1, drafts[..., None])[..., 0]
    q_y = draft_probs.gather(-1, drafts[..., None])[..., 0]
    ok = torch.where(greedy[:, None], match, uniforms[:, :K] * q_y < p_y)
    accepted = leading_true(ok & real)
    at = accepted.long()[:, None, None].expand(-1, 1, target.shape[-1])
    p = target.gather(1, at)[:, 0]
    q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1).gather(1, at)[:, 0]
    residual = (p - q).clamp(min=0)
    use_p = (greedy | (accepted == num_drafts))[:, None] | (residual.sum(-1, keepdim=True) <= 0)
    return accepted, sample(torch.where(use_p, p, residual), uniforms[:, K])
