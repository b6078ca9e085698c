"""The runtime's record of one request in flight: its tokens, its state slot, its MTP drafts, its output."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .requests import FinishReason, GenerationParams


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: GenerationParams
    mtp_k: int  # draft length for this request (0: no speculation)
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    slot: int = -1
    pages: list[int] = field(default_factory=list)  # KV pages (engines/runtime/pages.py), in position order
    computed: int = 0  # tokens whose state is in the slot (the backbone's past length)
    prefill_end: int = -1  # tokens read as a prompt: the prompt's, or after a preemption every token so far
    preemptions: int = 0
    # MTP: position t of the MTP sequence reads (x_{t+1}, c_t); its state follows the backbone's once the prompt
    # is read (the speculative executor step advances both)
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # c_t of the prompt, until its MTP pass
    drafts: list[int] = field(default_factory=list)
    # reasoning budget
    in_think: bool = False
    think_tokens: int = 0
    # output
    emitted_text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None  # where a stop string cut the text
    # statistics
    arrival: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    verify_steps: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # count of accepted drafts at position i

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt)
        if self.prefill_end < 0:
            self.prefill_end = len(self.prompt)
        self.accepted_per_position = [0] * self.mtp_k

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prefill_end

    def capacity(self) -> int:
        """The most tokens this sequence's state ever holds: prompt, output and the drafts of its last verify."""
        return len(self.prompt) + self.params.max_tokens + self.mtp_k

    def restart(self) -> None:
        """Preempted (its pages and slot taken back): recompute every token so far as a prompt when readmitted."""
        self.slot, self.computed, self.prefill_end = -1, 0, len(self.tokens)
        self.mtp_hidden, self.drafts = [], []
        self.preemptions += 1

    def stats(self) -> dict:
        out = {"input_tokens": len(self.prompt), "output_tokens": len(self.output)}
        if self.preemptions:
            out["preemptions"] = self.preemptions
        if self.token_times:
            out["time_to_first_token_s"] = self.token_times[0] - self.arrival
            # between consecutive outputs (a step that accepted several drafts emits them together)
            steps = sorted(set(self.token_times))
            out["inter_token_latencies_s"] = [b - a for a, b in zip(steps, steps[1:])]
            if len(self.token_times) > 1:
                out["time_per_output_token_s"] = (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)
        if self.verify_steps:
            accepted = sum(self.accepted_per_position)
            out["verify_steps"] = self.verify_steps
            out["acceptance_length"] = 1 + accepted / self.verify_steps  # tokens per verify forward
            out["acceptance_rate_per_position"] = [a / self.verify_steps for a in self.accepted_per_position]
        return out
