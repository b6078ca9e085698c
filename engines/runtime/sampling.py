"""Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator.

`distribution(logits, params)` is the probability distribution a request samples from; greedy is
temperature 0 (argmax, ties to the lower token id). Speculative decoding's rejection sampling uses
the same distribution for the target model, so sampling with and without MTP draws from one law.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_integer, check_number

MAX_SEED = 2**64 - 1  # a torch.Generator seed (TensorRT-LLM's `seed` input is UINT64 too)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request

    def __post_init__(self):
        check_number("temperature", self.temperature, minimum=0)
        check_integer("top_k", self.top_k, minimum=0)
        check_number("top_p", self.top_p, minimum=0, maximum=1)
        if self.top_p == 0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.seed is not None:
            check_integer("seed", self.seed, minimum=0, maximum=MAX_SEED)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return g


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] (fp32) after temperature, top-k and top-p; one-hot argmax if greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a distribution [V] (argmax when the distribution is one-hot/greedy)."""
    if generator is None:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
