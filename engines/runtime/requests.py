"""What a request asks for and what the runtime streams back.

A `Request` is a prompt (token ids) plus `GenerationParams`; the runtime answers with `Delta`s:
the new tokens and text of one scheduler step, the last one with `finished` set and the reason.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .checks import check_integer
from .sampling import SamplingParams

MAX_SPECULATIVE_TOKENS = 16  # MTP draft length; acceptance falls off long before


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # EOS, a stop token id or a stop string
    CANCELLED = "cancelled"
    REFUSED = "refused"  # can never fit the engine (too long for its state pool)
    ERROR = "error"  # a step serving it failed; stats["error"] says why (the engine serves on)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 64
    min_tokens: int = 0  # no EOS, stop token id or stop string before this many output tokens
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS
    ignore_eos: bool = False
    think_budget: int | None = None  # max tokens between <think> and </think>; then </think> is forced
    num_speculative_tokens: int | None = None  # MTP draft length k; None: the engine's default, 0: off

    def __post_init__(self):
        """Every field checked here, at the request boundary: a bad value is a one-line ValueError naming it."""
        check_integer("max_tokens", self.max_tokens, minimum=1)
        check_integer("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens}: must be in [0, max_tokens={self.max_tokens}]")
        self.sampling  # validates temperature / top_k / top_p / seed
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: must be a tuple of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: must be a tuple of token ids")
        for token in self.stop_token_ids:
            check_integer("stop_token_ids", token, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r}: must be a bool")
        if self.think_budget is not None:
            check_integer("think_budget", self.think_budget, minimum=0)
        if self.num_speculative_tokens is not None:
            check_integer("num_speculative_tokens", self.num_speculative_tokens, minimum=0,
                          maximum=MAX_SPECULATIVE_TOKENS)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass
class Delta:
    """One step's output of one request."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    stats: dict = field(default_factory=dict)  # on the last delta: token counts, acceptance, timings


_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"
