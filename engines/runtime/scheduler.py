"""The request-level runtime: continuous batching with chunked prefill, sampling, stop conditions,
cancellation, a reasoning budget and MTP speculative decoding, over any `Executor`.

One `step()`:
  1. admit waiting requests while a state slot is free;
  2. build one ragged batch within `max_num_tokens`: every decoding sequence's last token (plus its
     MTP drafts), then prefill chunks of the sequences still reading their prompt;
  3. one executor forward; sample / verify; apply the reasoning budget and stop conditions;
  4. for sequences with speculation, keep the Mamba state of the last accepted token, then run the
     MTP head to draft the next k tokens.
Requests join and leave between steps; a request's greedy output does not depend on its batch mates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..executors.base import Executor, RaggedBatch
from .checks import check_integer
from .requests import Delta, FinishReason, GenerationParams, new_request_id
from .sampling import distribution, sample
from .sequence import Sequence
from .slots import SlotPool
from .speculative import accept, draft
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
        if k and "M" in self.executor.spec.mtp_layer_types:
            raise ValueError(f"num_speculative_tokens={k}: drafting with Mamba layers in the MTP pattern "
                             f"({self.executor.spec.mtp_pattern!r}) would need MTP state rollback; not supported")
        seq = Sequence(request_id, ids, params, k, params.sampling.generator())
        seq.in_think = self.codec.thinking_after(ids)
        self._detok[request_id] = Detokenizer(self.codec, params.stop, params.min_tokens)
        # the state must hold the prompt, the output and the drafts of the last verify
        need = len(ids) + params.max_tokens + k
        if not ids:
            self._refuse(seq, "empty prompt")
        elif need > self.executor.max_length:
            self._refuse(seq, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) + drafts ({k}) "
                              f"exceed the engine's max_length={self.executor.max_length}")
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
        (sampling) fails that request; one in the shared work (the forward, state commits, MTP drafting) fails
        the requests of this step. Either way they end with FinishReason.ERROR and their slots are free."""
        deltas, self._finished = self._finished, []
        while self.waiting and self.slots.free:
            seq = self.waiting.popleft()
            seq.slot = self.slots.acquire()
            self.running[seq.request_id] = seq
        if not self.running:
            return deltas
        plan = self._plan()
        try:
            new = self._forward(plan)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine serves on
            self.failed_steps += 1
            return deltas + [self._fail(seq, e) for seq, _, _ in plan]
        for seq, emitted in new:
            deltas.append(self._fail(seq, emitted) if isinstance(emitted, Exception) else self._delta(seq, emitted))
            if seq.finished:
                self._finish(seq, seq.finish_reason)
        drafting = [seq for seq, emitted in new if seq.mtp_k and not seq.finished]
        try:
            self._draft(drafting)
        except Exception as e:  # noqa: BLE001
            self.failed_steps += 1
            return deltas + [self._fail(seq, e) for seq in drafting]
        self.failed_steps = 0
        return deltas

    def _forward(self, plan: list[tuple[Sequence, list[int], list[int]]]) -> list[tuple[Sequence, list[int] | Exception]]:
        """The executor forward over the plan, then each finishing row's tokens (or the exception choosing them
        raised); commits the Mamba states of verified drafts."""
        batch = RaggedBatch.build([(tokens, seq.computed, seq.slot) for seq, tokens, _ in plan],
                                  [row for _, _, rows in plan for row in rows],
                                  keep_steps=any(seq.drafts for seq, _, _ in plan))
        out = self.executor.forward(batch)
        all_logits = self._hold_back_stops(plan, out.logits)
        argmax = all_logits.argmax(-1).tolist()  # greedy choices and verifies, read back in one transfer
        now = time.perf_counter()
        logit_at, commits, new = 0, [], []
        for (seq, tokens, rows), start in zip(plan, batch.query_start.tolist()):
            logits = all_logits[logit_at:logit_at + len(rows)]
            best = argmax[logit_at:logit_at + len(rows)]
            logit_at += len(rows)
            hidden = out.hidden[start:start + len(tokens)]
            if seq.prefilling and seq.computed + len(tokens) < len(seq.prompt):  # a prefill chunk
                seq.computed += len(tokens)
                seq.mtp_hidden.extend(hidden) if seq.mtp_k else None
                continue
            try:
                emitted = self._choose(seq, logits, best)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                new.append((seq, e))
                continue
            emitted = self._apply_limits(seq, emitted)
            processed = len(tokens) if seq.prefilling else len(emitted)  # inputs whose state is kept
            if seq.drafts:
                commits.append((seq.slot, processed - 1))
            if seq.mtp_k:
                seq.mtp_hidden.extend(hidden[:processed])
            seq.computed += processed
            seq.drafts, seq.draft_probs = [], None
            seq.tokens.extend(emitted)
            seq.token_times.extend([now] * len(emitted))
            new.append((seq, emitted))
        if commits:
            self.executor.commit_steps([s for s, _ in commits], [k for _, k in commits])
        return new

    def _fail(self, seq: Sequence, error: Exception) -> Delta:
        """End a request whose step raised: its final delta carries the error in one line; its slot is freed."""
        message = (str(error).strip().splitlines() or [""])[0]
        self._finish(seq, FinishReason.ERROR)
        self._detok.pop(seq.request_id, None)
        stats = {**seq.stats(), "error": f"{type(error).__name__}: {message}" if message else type(error).__name__}
        return Delta(seq.request_id, [], "", True, FinishReason.ERROR, stats)

    def _plan(self) -> list[tuple[Sequence, list[int], list[int]]]:
        """(sequence, its new tokens, rows whose logits are needed) for this step, within the token budget."""
        plan, budget, row = [], self.max_num_tokens, 0
        decoding = [s for s in self.running.values() if not s.prefilling]
        prefilling = [s for s in self.running.values() if s.prefilling]
        for seq in decoding:
            tokens = [seq.tokens[-1]] + seq.drafts
            plan.append((seq, tokens, list(range(row, row + len(tokens)))))
            row += len(tokens)
            budget -= len(tokens)
        for seq in prefilling:
            if budget <= 0:
                break
            end = min(len(seq.prompt), seq.computed + budget)
            tokens = seq.tokens[seq.computed:end]
            plan.append((seq, tokens, [row + len(tokens) - 1] if end == len(seq.prompt) else []))
            row += len(tokens)
            budget -= len(tokens)
        return plan

    def _stop_ids(self, params: GenerationParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.codec.eos_ids)

    def _hold_back_stops(self, plan: list[tuple[Sequence, list[int], list[int]]], logits: torch.Tensor
                         ) -> torch.Tensor:
        """min_tokens: a logit row that chooses one of a request's first min_tokens output tokens cannot choose
        a stop id: EOS (TensorRT-LLM masks its end id so) and the request's stop token ids (as vLLM does). Row i
        of a sequence chooses output token len(output) + i, so a rejected draft is resampled without them too."""
        rows, ids, at = [], [], 0
        for seq, _, seq_rows in plan:
            held = min(len(seq_rows), seq.params.min_tokens - len(seq.output))
            stops = sorted(self._stop_ids(seq.params)) if held > 0 else []
            for i in range(held if stops else 0):
                rows += [at + i] * len(stops)
                ids += stops
            at += len(seq_rows)
        if not rows:
            return logits
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        return logits.index_put(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))

    def _choose(self, seq: Sequence, logits: torch.Tensor, argmax: list[int]) -> list[int]:
        """Tokens produced by this step's logits (and their argmax): one sample, or the outcome of verifying
        the drafts."""
        params = seq.params.sampling
        if not seq.drafts:
            return [argmax[-1] if params.greedy else sample(distribution(logits[-1], params), seq.generator)]
        emitted, accepted = accept(seq.drafts, seq.draft_probs, logits, argmax, params, seq.generator)
        seq.verify_steps += 1
        for i in range(accepted):
            seq.accepted_per_position[i] += 1
        return emitted

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
        seq.slot = -1

    # ---- MTP drafting ----------------------------------------------------------------------------
    def _draft(self, seqs: list[Sequence]) -> None:
        """Bring each sequence's MTP state up to date and draft its next k tokens."""
        if not seqs:
            return
        # catch-up: MTP positions mtp_computed .. computed-1 read x_{t+1} (all known now) and c_t
        batch = RaggedBatch.build(
            [(s.tokens[s.mtp_computed + 1:s.computed + 1], s.mtp_computed, s.slot) for s in seqs], [])
        batch.logit_rows = batch.query_start[1:] - 1
        hidden = torch.cat([torch.stack(s.mtp_hidden) for s in seqs])
        out = self.executor.mtp_forward(batch, hidden)
        last = out.hidden[batch.logit_rows]
        for s in seqs:
            s.mtp_computed, s.mtp_hidden, s.draft_probs = s.computed, [], [] if not s.params.sampling.greedy else None
        logits = out.logits
        for i in range(max(s.mtp_k for s in seqs)):
            for s, row, best in zip(seqs, logits, logits.argmax(-1).tolist()):
                if i < s.mtp_k and s.params.sampling.greedy:
                    s.drafts.append(best)
                elif i < s.mtp_k:
                    token, q = draft(row, s.params.sampling, s.generator)
                    s.drafts.append(token)
                    s.draft_probs.append(q)
            active = [j for j, s in enumerate(seqs) if i + 1 < s.mtp_k]
            if not active:
                break
            # the next draft extends the MTP sequence by one (speculative) position
            seqs, last = [seqs[j] for j in active], last[active]
            step = RaggedBatch.build([([s.drafts[-1]], s.computed + i, s.slot) for s in seqs], list(range(len(seqs))))
            out = self.executor.mtp_forward(step, last)
            logits, last = out.logits, out.hidden

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
