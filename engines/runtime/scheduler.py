"""The request-level runtime: continuous batching with chunked prefill, sampling, stop conditions,
cancellation, a reasoning budget and MTP speculative decoding, over any `Executor`.

One `step()`:
  1. admit waiting requests while a state slot and the KV pages of their prompt are free;
  2. plan within `max_num_tokens`: every decoding sequence's last token (plus its MTP drafts), then
     prefill chunks of the sequences still reading their prompt; give each the KV pages its tokens (and the
     MTP positions written after them) need (engines/runtime/pages.py); when pages run out, preempt the newest
     sequence (its slot and pages go back, it waits at the head of the queue and recomputes its tokens when
     readmitted);
  3. when a decoding sequence speculates, all decoding sequences run one speculative executor call
     (MTP "one-model": verify, accept, keep the Mamba state of the last accepted token and draft the next
     k tokens, all in one call, read back once; rows without speculation are plain decode rows); the
     prefill chunks (and otherwise the decoding sequences too) run one ragged forward and are sampled; each
     call carries the page updates of its sequences;
  4. apply the reasoning budget and stop conditions; a sequence with speculation that finished its
     prompt (a recomputed one too, after a preemption) runs the MTP head over it, so that its next step drafts.
Requests join and leave between steps; a request's greedy output does not depend on its batch mates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..executors.base import Executor, RaggedBatch, SpeculativeBatch
from ..network.mamba2 import MAX_STEP_TOKENS
from .checks import check_integer
from .requests import Delta, FinishReason, GenerationParams, new_request_id
from .pages import PagePool
from .sampling import NOT_FINITE, distribution, sample
from .sequence import Sequence
from .slots import SlotPool
from .text import Detokenizer, TextCodec


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stats: dict


class Scheduler:
    def __init__(self, executor: Executor, codec: TextCodec | None = None, max_num_tokens: int = 256,
                 num_speculative_tokens: int = 0):
        if max_num_tokens < 1:
            raise ValueError(f"max_num_tokens={max_num_tokens}: must be >= 1")
        if num_speculative_tokens and not executor.has_mtp:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens}: this model has no MTP layers")
        self.executor, self.codec = executor, codec or TextCodec(None, executor.spec)
        self.max_num_tokens, self.default_k = max_num_tokens, num_speculative_tokens
        self.slots = SlotPool(executor.max_sequences)
        self.pages = PagePool(executor.num_pages, executor.page_size)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._finished: list[Delta] = []  # cancellations and refusals, reported by the next step
        self.failed_steps = 0  # consecutive steps whose shared work raised (0 after a good step)
        executor.warm_up(1 + num_speculative_tokens)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: GenerationParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or GenerationParams()
        if not isinstance(params, GenerationParams):
            raise ValueError(f"params: expected GenerationParams, got {type(params).__name__}")
        ids = self.codec.encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.executor.spec.vocab_size
        for name, tokens in (("prompt", ids), ("stop_token_ids", params.stop_token_ids)):
            for token in tokens:
                check_integer(f"{name} token id", token, minimum=0, maximum=vocab - 1)
        request_id = request_id or new_request_id()
        k = self.default_k if params.num_speculative_tokens is None else params.num_speculative_tokens
        if k and not self.executor.has_mtp:
            raise ValueError(f"num_speculative_tokens={k}: this model has no MTP layers")
        if k >= MAX_STEP_TOKENS:
            raise ValueError(f"num_speculative_tokens={k}: at most {MAX_STEP_TOKENS - 1} drafts (a verify of k+1 "
                             f"tokens runs the Mamba decode ops)")
        if k and "M" in self.executor.spec.mtp_layer_types:
            raise ValueError(f"num_speculative_tokens={k}: drafting with Mamba layers in the MTP pattern "
                             f"({self.executor.spec.mtp_pattern!r}) would need MTP state rollback; not supported")
        seq = Sequence(request_id, ids, params, k, params.sampling.generator())
        seq.in_think = self.codec.thinking_after(ids)
        self._detok[request_id] = Detokenizer(self.codec, params.stop, params.min_tokens)
        # the state must hold the prompt, the output and the drafts of the last verify
        need = seq.capacity()
        if not ids:
            self._refuse(seq, "empty prompt")
        elif need > self.executor.max_length:
            self._refuse(seq, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) + drafts ({k}) "
                              f"exceed the engine's max_length={self.executor.max_length}")
        elif self.pages.pages_for(need) > self.pages.num_pages:
            self._refuse(seq, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) + drafts ({k}) need "
                              f"{self.pages.pages_for(need)} KV pages of {self.pages.page_size} tokens; the engine "
                              f"has {self.pages.num_pages}")
        else:
            self.waiting.append(seq)
        return request_id

    def _refuse(self, seq: Sequence, why: str) -> None:
        seq.finished, seq.finish_reason = True, FinishReason.REFUSED
        self._finished.append(Delta(seq.request_id, [], "", True, FinishReason.REFUSED, {"error": why}))
        self._detok.pop(seq.request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Stop a request now; its slot is free at once. False if it is unknown or already finished."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                break
        else:
            seq = self.running.get(request_id)
            if seq is None:
                return False
        self._finish(seq, FinishReason.CANCELLED)
        self._finished.append(Delta(request_id, [], "", True, FinishReason.CANCELLED, seq.stats()))
        self._detok.pop(request_id, None)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished)

    # ---- one scheduler step --------------------------------------------------------------------
    def step(self) -> list[Delta]:
        """One scheduler step. A request never takes the engine down: an exception while serving one sequence
        (sampling) fails that request; one in shared work (an executor call, the MTP pass over a prompt) fails
        the requests of that call. Either way they end with FinishReason.ERROR and their slots are free."""
        deltas, self._finished = self._finished, []
        while self.waiting and self.slots.free and self.pages.free >= self.pages.pages_for(self._first(self.waiting[0])):
            seq = self.waiting.popleft()
            seq.slot = self.slots.acquire()
            self.pages.grow(seq.slot, seq.pages, self._first(seq))
            self.running[seq.request_id] = seq
        if not self.running:
            return deltas
        plan, calls, new, failed = self._plan_with_pages(), [], [], False
        if any(seq.mtp_k for seq, _, _ in plan if not seq.prefilling):
            calls.append((self._speculate, [seq for seq, _, _ in plan if not seq.prefilling]))
            plan = [entry for entry in plan if entry[0].prefilling]
        if plan:
            calls.append((self._forward, plan))
        for call, part in calls:
            try:
                new += call(part)
            except Exception as e:  # noqa: BLE001 - the call's requests fail, the engine serves on
                failed = True
                new += [(entry[0] if isinstance(entry, tuple) else entry, e) for entry in part]
        for seq, emitted in new:
            deltas.append(self._fail(seq, emitted) if isinstance(emitted, Exception) else self._delta(seq, emitted))
            if seq.finished:
                self._finish(seq, seq.finish_reason)
        self.failed_steps = self.failed_steps + 1 if failed else 0
        return deltas

    def _forward(self, plan: list[tuple[Sequence, list[int], bool]]) -> list[tuple[Sequence, list[int]]]:
        """One ragged forward over the plan's sequences (with the page updates not sent yet); sample those that
        reached their next token."""
        ends, rows = 0, []
        for _, tokens, next_token in plan:
            ends += len(tokens)
            rows += [ends - 1] if next_token else []
        batch = RaggedBatch.build([(tokens, seq.computed, seq.slot) for seq, tokens, _ in plan], rows,
                                  pages=self.pages.take_updates())
        out = self.executor.forward(batch)
        held = [(row, token) for row, seq in enumerate(seq for seq, _, next_token in plan if next_token)
                for token in self._held_stops(seq, 1)[0]]
        logits = out.logits
        if held:
            index = torch.tensor(held, device=logits.device).T
            logits = logits.index_put(tuple(index), torch.tensor(float("-inf"), device=logits.device))
        argmax = logits.argmax(-1).tolist()  # greedy choices, read back in one transfer
        now = time.perf_counter()
        logit_at, new = 0, []
        for (seq, tokens, next_token), start in zip(plan, batch.query_start.tolist()):
            hidden = out.hidden[start:start + len(tokens)]
            if seq.mtp_k and seq.prefilling:
                seq.mtp_hidden.extend(hidden)
            seq.computed += len(tokens)
            if not next_token:  # a prefill chunk before the prompt's end
                continue
            params = seq.params.sampling
            try:
                token = argmax[logit_at] if params.greedy else sample(distribution(logits[logit_at], params),
                                                                      seq.generator)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                new.append((seq, e))
                continue
            finally:
                logit_at += 1
            emitted = self._apply_limits(seq, [token])
            seq.tokens.extend(emitted)
            seq.token_times.extend([now] * len(emitted))
            new.append((seq, emitted))
        self._start_drafting([seq for seq, emitted in new if seq.mtp_k and seq.mtp_hidden and not seq.finished
                              and not isinstance(emitted, Exception)])
        return new

    def _speculate(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """One speculative executor call for every decoding sequence (see SpeculativeBatch), with their page
        updates."""
        K = max(seq.mtp_k for seq in seqs)
        sampling = [seq.params.sampling for seq in seqs]
        batch = SpeculativeBatch(
            token_ids=torch.tensor([[seq.tokens[-1]] + seq.drafts + [0] * (K - len(seq.drafts)) for seq in seqs]),
            num_drafts=torch.tensor([len(seq.drafts) for seq in seqs]),
            past_lengths=torch.tensor([seq.computed for seq in seqs]),
            slots=torch.tensor([seq.slot for seq in seqs]),
            temperature=torch.tensor([p.temperature for p in sampling], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in sampling]),
            top_p=torch.tensor([p.top_p for p in sampling], dtype=torch.float32),
            uniforms=None if all(p.greedy for p in sampling) else torch.stack([self._uniforms(s, K) for s in seqs]),
            banned=self._banned(seqs, K), pages=self.pages.take_updates({seq.slot for seq in seqs}))
        results = self.executor.speculate(batch)
        now = time.perf_counter()
        new = []
        for seq, (accepted, token, *drafts) in zip(seqs, results):
            if accepted < 0:
                new.append((seq, RuntimeError(NOT_FINITE)))
                continue
            if seq.drafts:
                seq.verify_steps += 1
                for i in range(accepted):
                    seq.accepted_per_position[i] += 1
            emitted = self._apply_limits(seq, seq.drafts[:accepted] + [token])
            seq.computed += len(emitted)  # (the state kept is that after the input before the last token)
            seq.tokens.extend(emitted)
            seq.token_times.extend([now] * len(emitted))
            seq.drafts = drafts[:self._draft_length(seq)]
            new.append((seq, emitted))
        return new

    def _banned(self, seqs: list[Sequence], K: int) -> torch.Tensor | None:
        """min_tokens in a speculative step: (row, position, token id) triples that may not be chosen."""
        triples = [(row, i, token) for row, seq in enumerate(seqs)
                   for stops, held in [self._held_stops(seq, K + 1)] for i in range(held) for token in stops]
        return torch.tensor(triples) if triples else None

    def _held_stops(self, seq: Sequence, rows: int) -> tuple[list[int], int]:
        """min_tokens: the stop ids that the first of a sequence's next `rows` logit rows (row i choosing output
        token len(output) + i) may not choose, and how many rows: EOS (TensorRT-LLM masks its end id so) and
        the request's stop token ids (as vLLM does); a rejected draft is resampled without them too."""
        held = min(rows, seq.params.min_tokens - len(seq.output))
        stops = sorted(self._stop_ids(seq.params)) if held > 0 else []
        return stops, held if stops else 0

    def _fail(self, seq: Sequence, error: Exception) -> Delta:
        """End a request whose step raised: its final delta carries the error in one line; its slot is freed."""
        message = (str(error).strip().splitlines() or [""])[0]
        self._finish(seq, FinishReason.ERROR)
        self._detok.pop(seq.request_id, None)
        stats = {**seq.stats(), "error": f"{type(error).__name__}: {message}" if message else type(error).__name__}
        return Delta(seq.request_id, [], "", True, FinishReason.ERROR, stats)

    def _first(self, seq: Sequence) -> int:
        """Tokens whose pages a sequence gets when admitted: its prompt (or all its tokens, after a preemption)."""
        return min(seq.prefill_end + 1 + seq.mtp_k, seq.capacity())

    def _step_tokens(self, seq: Sequence, tokens: list[int]) -> int:
        """Tokens a sequence's state holds after this step: its new tokens, and the MTP drafts written after them
        (a speculative step writes and reads MTP positions up to past + accepted + k - 1)."""
        return min(seq.computed + len(tokens) + seq.mtp_k, seq.capacity())

    def _plan_with_pages(self) -> list[tuple[Sequence, list[int], bool]]:
        """This step's plan, every planned sequence holding the pages it writes; preempts the newest sequences
        while the free pages do not cover the plan (a lone sequence always fits: add_request checked it)."""
        while True:
            plan = self._plan()
            short = sum(self.pages.missing(seq.pages, self._step_tokens(seq, tokens)) for seq, tokens, _ in plan)
            if short <= self.pages.free or len(self.running) == 1:
                break
            self._preempt(next(reversed(self.running.values())))
        for seq, tokens, _ in plan:
            self.pages.grow(seq.slot, seq.pages, self._step_tokens(seq, tokens))
        return plan

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.request_id]
        self.slots.release(seq.slot)
        self.pages.release(seq.pages)
        seq.restart()
        self.waiting.appendleft(seq)

    def _stop_ids(self, params: GenerationParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.codec.eos_ids)

    @staticmethod
    def _uniforms(seq: Sequence, K: int) -> torch.Tensor:
        """[2K+1]: the acceptance tests, the next token's draw, the drafts' draws; a sampled request takes 2k+1
        from its generator per step whatever its batch mates, a greedy one none."""
        out = torch.zeros(2 * K + 1)
        if seq.generator is not None:
            k = seq.mtp_k
            u = torch.rand(2 * k + 1, generator=seq.generator)
            out[:k], out[K], out[K + 1:K + 1 + k] = u[:k], u[k], u[k + 1:]
        return out

    def _draft_length(self, seq: Sequence) -> int:
        """Drafts to verify next: k, or fewer near the end of a reasoning budget, so that a forced end of
        thinking can only replace the token after the accepted drafts (whose Mamba state the step kept)."""
        params = seq.params
        if params.think_budget is None or self.codec.think_end is None:
            return seq.mtp_k
        return min(seq.mtp_k, max(0, params.think_budget - seq.think_tokens))

    def _plan(self) -> list[tuple[Sequence, list[int], bool]]:
        """(sequence, its new tokens, whether its next token follows them) for this step, within the token
        budget."""
        plan, budget = [], self.max_num_tokens
        decoding = [s for s in self.running.values() if not s.prefilling]
        prefilling = [s for s in self.running.values() if s.prefilling]
        for seq in decoding:
            tokens = [seq.tokens[-1]] + seq.drafts
            plan.append((seq, tokens, True))
            budget -= len(tokens)
        for seq in prefilling:
            if budget <= 0:
                break
            end = min(seq.prefill_end, seq.computed + budget)
            plan.append((seq, seq.tokens[seq.computed:end], end == seq.prefill_end))
            budget -= end - seq.computed
        return plan

    def _apply_limits(self, seq: Sequence, emitted: list[int]) -> list[int]:
        """Reasoning budget, EOS / stop ids and max_tokens, token by token; may shorten `emitted`."""
        params, codec, kept = seq.params, self.codec, []
        stop_ids = self._stop_ids(params)
        for token in emitted:
            if seq.in_think and params.think_budget is not None and seq.think_tokens >= params.think_budget \
                    and codec.think_end is not None:
                token = codec.think_end  # budget spent: force the end of thinking, drop later drafts
            kept.append(token)
            if token == codec.think_start:
                seq.in_think = True
            elif token == codec.think_end:
                seq.in_think = False
            elif seq.in_think:
                seq.think_tokens += 1
            if token in stop_ids:
                seq.finished, seq.finish_reason = True, FinishReason.STOP
                break
            if len(seq.output) + len(kept) >= params.max_tokens:
                seq.finished, seq.finish_reason = True, FinishReason.LENGTH
                break
            if token != emitted[len(kept) - 1]:  # forced: the rest of the drafts no longer apply
                break
        return kept

    def _delta(self, seq: Sequence, emitted: list[int]) -> Delta:
        detok = self._detok[seq.request_id]
        text, stopped = detok.push(emitted)
        if stopped:  # a stop string ends the text even when the last token also hit max_tokens
            seq.finished, seq.finish_reason = True, FinishReason.STOP
        elif seq.finished:
            text += detok.flush()
        if seq.finished:
            self._detok.pop(seq.request_id, None)
        return Delta(seq.request_id, emitted, text, seq.finished, seq.finish_reason,
                     seq.stats() if seq.finished else {})

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finished, seq.finish_reason = True, reason
        if self.running.pop(seq.request_id, None) is not None:
            self.slots.release(seq.slot)
            self.pages.release(seq.pages)
        seq.slot = -1

    # ---- MTP drafting ----------------------------------------------------------------------------
    def _start_drafting(self, seqs: list[Sequence]) -> None:
        """After the prompt: the MTP head reads its positions 0 .. computed-1 (x_{t+1}, all known now, and the
        backbone's c_t), so that each sequence's next (speculative) step drafts from where it stands."""
        if not seqs:
            return
        batch = RaggedBatch.build([(s.tokens[1:s.computed + 1], 0, s.slot) for s in seqs], [])
        self.executor.mtp_forward(batch, torch.cat([torch.stack(s.mtp_hidden) for s in seqs]))
        for s in seqs:
            s.mtp_hidden = []

    # ---- convenience -----------------------------------------------------------------------------
    def run_until_done(self) -> Iterator[Delta]:
        while self.has_work():
            yield from self.step()

    def generate(self, prompts: list[str | list[int]], params: GenerationParams | list[GenerationParams] | None = None
                 ) -> list[Completion]:
        """Generate for a batch of prompts (continuous batching among them); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or GenerationParams()] * len(prompts)
        ids = [self.add_request(p, q) for p, q in zip(prompts, params_list)]
        results = {i: Completion(i, [], "", FinishReason.LENGTH, {}) for i in ids}
        for delta in self.run_until_done():
            if delta.request_id in results:
                r = results[delta.request_id]
                r.token_ids += delta.token_ids
                r.text += delta.text
                if delta.finished:
                    r.finish_reason, r.stats = delta.finish_reason, delta.stats
        return [results[i] for i in ids]

    def stream(self, prompt: str | list[int], params: GenerationParams | None = None) -> Iterator[Delta]:
        """Stream one request's deltas (other requests already added keep running alongside)."""
        request_id = self.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for delta in self.step():
                    if delta.request_id == request_id:
                        finished = delta.finished
                        yield delta
                        if finished:
                            return
        finally:
            if not finished:  # the caller stopped iterating: free the slot
                self.cancel(request_id)
                self._finished = [d for d in self._finished if d.request_id != request_id]
