"""The torch executor: the eager network (`engines.network.Model`) over a ragged batch, with compiled decode
steps where the model allows them (executors/compiled_step.py)."""

from __future__ import annotations

import torch

from ...export.kv_pages import DEFAULT_PAGE_SIZE
from .base import ForwardOutput, RaggedBatch, SpeculativeBatch
from .compiled_step import PREFILL_TOKENS, SPECULATIVE_PADDING, CompiledSteps, speculative_step, unsupported

PAD_SHORT = 8  # MTP rows of at most this many tokens are padded into one call


class TorchExecutor:
    """Runs `engines.model.Model` (our kernels on GPU, their references on CPU).

    Sequences with the same number of new tokens run as one rectangular [B, T] call of the model. With
    `compile` (True; or None: when `compiled_step.unsupported` finds nothing against it), decode, verify and
    MTP calls of the shapes `warm_up` prepared are padded to [max_sequences, T] and run as compiled steps
    (engines/compiled_step.py), prefill chunks too, their rows right-padded to the next of `prefill_tokens`
    (MTP passes over a prompt run eagerly). K and V live in `num_pages` pages of `page_size`
    tokens (default: max_length tokens for every slot), which each batch maps to slots (`RaggedBatch.pages`).
    """

    def __init__(self, model, max_sequences: int, max_length: int, compile: bool | None = False,
                 num_pages: int | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 prefill_tokens: tuple[int, ...] = PREFILL_TOKENS):
        self.model, self.spec = model, model.spec
        self.max_sequences, self.max_length = max_sequences, max_length
        self.has_mtp = model.mtp is not None
        # (the padding of a speculative step, a row verifying fewer drafts than its batch mates, writes past the
        # row's pages: store_in_pages drops those writes)
        self.state = model.new_state(max_sequences, max_length, mtp=self.has_mtp, num_pages=num_pages,
                                     page_size=page_size)
        self.num_pages, self.page_size = self.state.num_pages, page_size
        self._draft_probs: dict[int, torch.Tensor] = {}  # K -> [max_sequences, K, V]: each slot's draft distributions
        if compile is None:
            compile = unsupported(model) is None
        self.compiled = CompiledSteps(model, self.state, prefill_tokens) if compile else None

    @property
    def kind(self) -> str:
        """How decode steps run, as bench reports it: "compiled" or "eager" (aot_executor.py: "aot")."""
        return "eager" if self.compiled is None else "compiled"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _groups(self, lengths: list[int], past: list[int], mtp: bool) -> list[tuple[list[int], int]]:
        """(sequence indices, T) for each distinct query length; for an `mtp` call, every sequence of at most
        PAD_SHORT tokens (whose slot can hold the padding) joins one group of the longest of them."""
        groups: dict[int, list[int]] = {}
        short = [s for s, n in enumerate(lengths) if mtp and n <= PAD_SHORT]
        T_short = max((lengths[s] for s in short), default=0)
        short = [s for s in short if past[s] + T_short <= self.max_length]
        for s, n in enumerate(lengths):
            if s not in short:
                groups.setdefault(n, []).append(s)
        merged = [(short, max(lengths[s] for s in short))] if short else []
        return merged + sorted(((seqs, T) for T, seqs in groups.items()), key=lambda group: group[1])

    def _run(self, batch: RaggedBatch, eager, compiled=None, mtp: bool = False) -> torch.Tensor:
        """Apply a step (rows [B, T], slots [B], past [B]) -> out [B, T, D] per group; return out by row [N, D].

        rows index the packed tokens; a row shorter than its group is right-padded with row index N (a
        padding token the caller appends), whose outputs are dropped. Groups of a length the compiled steps
        cover (CompiledSteps.chunk_tokens) run the `compiled` step when there is one, padded with slot -1 rows to
        max_sequences and, a prefill chunk, each row right-padded to the compiled length (its real `lengths`
        [B] passed as a fourth argument). (The batch is small host metadata: it is indexed as lists, so a
        decode step costs a few tensor constructions, not dozens of tiny tensor ops.)"""
        lengths, starts = batch.lengths.tolist(), batch.query_start.tolist()
        slots_all, past_all = batch.slots.tolist(), batch.past_lengths.tolist()
        out, n, dev = None, len(batch.token_ids), self.device
        for seqs, T in self._groups(lengths, past_all, mtp):
            slots, past, step = [slots_all[s] for s in seqs], [past_all[s] for s in seqs], eager
            extra = []  # a compiled prefill chunk's lengths
            T_run = None if compiled is None else self.compiled.chunk_tokens(T)
            if T_run is not None:
                if T_run == 1 and 0 in past:  # (a one-token prompt) decode continues a slot's state: zero it first
                    self.state.reset_fresh(torch.tensor(slots, device=dev), torch.tensor(past, device=dev))
                self.compiled.read_pages(max(past) + T_run)
                pad = self.max_sequences - len(seqs)
                slots, past, step, T = slots + [-1] * pad, past + [0] * pad, compiled, T_run
                extra = [[lengths[s] for s in seqs] + [0] * pad] if T_run > 1 else []
            rows = [[starts[s] + i if i < lengths[s] else n for i in range(T)] for s in seqs]
            rows += [[n] * T] * (len(slots) - len(seqs))
            h = step(*(torch.tensor(x, device=dev) for x in [rows, slots, past] + extra)).flatten(0, 1)
            take = [b * T + i for b, s in enumerate(seqs) for i in range(lengths[s])]  # real rows of h
            if len(take) == n:  # one group holds every row, in order
                return h[torch.tensor(take, device=dev)] if len(take) < len(h) else h
            if out is None:
                out = h.new_empty(n, h.shape[-1])
            out[torch.tensor([starts[s] + i for s in seqs for i in range(lengths[s])], device=dev)] = \
                h[torch.tensor(take, device=dev)]
        return out

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch) -> ForwardOutput:
        self._map_pages(batch.pages)
        ids = torch.cat([batch.token_ids, batch.token_ids.new_zeros(1)]).to(self.device)
        compiled = None if self.compiled is None else (
            lambda rows, slots, past, lengths=None: self.compiled.backbone(ids[rows], slots, past, lengths))
        hidden = self._run(batch, lambda rows, slots, past: self.model.final_hidden(
            self.model(ids[rows], self.state, slots, past)), compiled)
        return ForwardOutput(self.model.lm_head(hidden[batch.logit_rows.to(self.device)]).float(), hidden)

    @torch.inference_mode()
    def mtp_forward(self, batch: RaggedBatch, hidden: torch.Tensor) -> ForwardOutput:
        # The MTP layers are attention and MoE (no Mamba state, checked by the runtime): a row padded at its end
        # writes K/V only past its own length, where the next real tokens overwrite them before any query
        # reads them, so rows of different lengths share one call.
        ids = torch.cat([batch.token_ids, batch.token_ids.new_zeros(1)]).to(self.device)
        hidden = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])])
        embed = self.model.backbone.embeddings
        out = self._run(batch, lambda rows, slots, past: self.model.mtp(embed(ids[rows]), hidden[rows], self.state,
                                                                        slots, past), mtp=True)
        return ForwardOutput(self.model.lm_head(out[batch.logit_rows.to(self.device)]).float(), out)

    @torch.inference_mode()
    def speculate(self, batch: SpeculativeBatch) -> list[list[int]]:
        self._map_pages(batch.pages)
        rows, K = batch.token_ids.shape[0], batch.token_ids.shape[1] - 1
        args = [batch.token_ids, batch.num_drafts, batch.slots, batch.past_lengths, batch.temperature, batch.top_k,
                batch.top_p, batch.uniforms]
        if self.compiled is not None:  # padding rows: slot -1, greedy, nothing to verify
            pad = self.max_sequences - rows
            args = [None if a is None else torch.cat([a, a.new_full((pad, *a.shape[1:]), v)])
                    for a, v in zip(args, SPECULATIVE_PADDING)]
        args = [None if a is None else a.to(self.device) for a in args]
        banned = None
        if batch.banned is not None:
            banned = torch.zeros(len(args[0]), K + 1, self.spec.vocab_size, dtype=torch.bool, device=self.device)
            banned[tuple(batch.banned.to(self.device).T)] = True
        if batch.uniforms is not None and K not in self._draft_probs:
            self._draft_probs[K] = torch.zeros(self.max_sequences, K, self.spec.vocab_size, device=self.device)
            if self.compiled is not None and self.device.type == "cuda":  # updated in place by CUDA graph replays
                torch._dynamo.mark_static_address(self._draft_probs[K])
        probs = None if batch.uniforms is None else self._draft_probs[K]
        if self.compiled is not None:
            # reads reach the last draft's position: past + accepted (<= K) + K - 1
            self.compiled.read_pages(int(batch.past_lengths.max()) + 2 * K)
            out = self.compiled.speculative(*args, probs, banned)
        else:
            with self.state.recording_steps():
                out = speculative_step(self, *args, probs, banned)
        return out[:rows].tolist()

    def _map_pages(self, pages: list[tuple[int, int, list[int]]]) -> None:
        for slot, first, ids in pages:
            self.state.map_pages(slot, first, ids)

    def warm_up(self, max_tokens: int) -> None:
        if self.compiled is not None:
            self.compiled.warm_up(max_tokens)

    def failure(self) -> str | None:
        return None  # (one process: nothing can fail apart from a call, which raises)

    def close(self) -> None:
        pass  # (the memory goes with the executor)
