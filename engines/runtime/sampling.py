"""Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator.

`distribution(logits, params)` is the probability distribution a request samples from; greedy is
temperature 0 (argmax, ties to the lower token id). Speculative decoding's rejection sampling uses
the same distribution for the target model, so sampling with and without MTP draws from one law.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..network.token_choice import distributions, sample as sample_by_uniform
from .checks import check_integer, check_number

NOT_FINITE = "sampling: the distribution is not finite (a temperature too small for the logits?)"
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
    """Probabilities [..., V] (fp32) after temperature, top-k and top-p; one-hot argmax if greedy (the same
    function the compiled speculative step applies to every row, engines/network/token_choice.py)."""
    row = logits.reshape(1, -1, logits.shape[-1])
    probs = distributions(row, torch.tensor([params.temperature]), torch.tensor([params.top_k]),
                          torch.tensor([params.top_p]))
    return probs.view(logits.shape)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a distribution [V]: inverse CDF at one uniform from the request's generator, as the
    compiled speculative step draws (argmax when there is no generator: greedy)."""
    if generator is None:
        return int(probs.argmax())
    if not bool(torch.isfinite(probs).all()):
        raise RuntimeError(NOT_FINITE)
    return int(sample_by_uniform(probs, torch.rand((), generator=generator)))
