"""Tensor-parallel execution: the leader's `Executor` drives every rank's network through one call.

The leader process (rank 0) runs the Scheduler over a `DistributedExecutor`. Each call (forward,
mtp_forward, speculate, warm_up) is sent to the worker ranks over their pipes before the leader
runs its own part, so every rank runs the same call on its part of the network and the collectives
inside it (engines/network/parallel.py) meet. The logits are all-gathered: the leader samples from
its own copy and the workers' results are dropped.

    leader  -> worker   one message per call: an int64 vector [command, flag, N, S, L, H, P, token ids (N),
                        query starts (S+1), past lengths (S), slots (S), logit rows (L), page updates (P values:
                        slot, first entry, count, pages... per update)]; an MTP call's hidden rows [H, D] follow
                        as a broadcast from rank 0 on the network's device (gloo on CPU, NCCL on GPU).
                        speculate: [command, has uniforms, B, K, Q, 0, P, token ids (B(K+1)), drafts (B), past
                        lengths (B), slots (B), top_k (B), banned (3Q), page updates (P values)], then a
                        broadcast of the float parameters [temperature (B), top_p (B), uniforms (B(2K+1)) if any]

No message is pickled. A worker runs `serve_rank`: it loads its rank's weights, reports READY and
executes calls until its pipe closes (the leader closed or exited). When a rank dies, hangs past the
process group's timeout or raises, the call in progress raises `RankFailure` with one line naming the
rank, and every later call raises it at once: the ranks cannot continue without each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..network.loading import load_rank
from ..network.parallel import Parallel
from .aot_executor import AOTExecutor
from .base import ForwardOutput, RaggedBatch, SpeculativeBatch
from .sequence_budget import sequence_budget
from .torch_executor import TorchExecutor

FORWARD, MTP_FORWARD, SPECULATE, WARM_UP = 1, 2, 3, 4
HEADER = 7  # command, flag, N, S, L, H, P


class RankFailure(RuntimeError):
    """The ranks can no longer run together; the message (one line) says which rank and why."""


class DistributedExecutor:
    """The Executor protocol over tensor-parallel ranks; `local` runs rank 0's part. `workers` is
    runtime/launcher.py's `Workers` (their pipes, failure(), close())."""

    def __init__(self, local: TorchExecutor, workers):
        self.local, self.workers = local, workers
        self.spec, self.has_mtp, self.model, self.compiled = local.spec, local.has_mtp, local.model, local.compiled
        self.kind = local.kind  # how decode steps run, as bench reports it
        self.max_sequences, self.max_length = local.max_sequences, local.max_length
        self.num_pages, self.page_size = local.num_pages, local.page_size
        self._failure: str | None = None

    def forward(self, batch: RaggedBatch) -> ForwardOutput:
        return self._call(_encode(FORWARD, batch), lambda: self.local.forward(batch))

    def mtp_forward(self, batch: RaggedBatch, hidden: torch.Tensor) -> ForwardOutput:
        def run():
            rows = hidden.to(self.local.device, self.local.model.dtype).contiguous()
            self.local.model.parallel.broadcast(rows)
            return self.local.mtp_forward(batch, rows)

        return self._call(_encode(MTP_FORWARD, batch, hidden.shape[0]), run)

    def speculate(self, batch: SpeculativeBatch) -> list[list[int]]:
        def run():
            self.local.model.parallel.broadcast(_floats(batch).to(self.local.device))
            return self.local.speculate(batch)

        return self._call(_encode_speculative(batch), run)

    def warm_up(self, max_tokens: int) -> None:
        self._call(_message(WARM_UP, 0, max_tokens, 0, 0, 0, [], []), lambda: self.local.warm_up(max_tokens))

    def failure(self) -> str | None:
        """Why the ranks can no longer serve, or None while they can."""
        if self._failure is None:
            self._failure = self.workers.failure()
        return self._failure

    def close(self) -> None:
        """Stop the worker ranks and leave the process group (no process is left behind)."""
        self.workers.close()

    def _call(self, message: bytes, run: Callable):
        if self.failure() is not None:
            raise RankFailure(self._failure)
        try:
            for connection in self.workers.connections:
                connection.send_bytes(message)
            return run()
        except Exception as e:
            self._failure = self.workers.failure(e)
            self.workers.close()  # the others may wait at a collective the failed rank never joins
            raise RankFailure(self._failure) from e


def rank_executor(model, max_sequences: int, max_length: int, state_memory: int | None,
                  engines: Path | None) -> TorchExecutor:
    """A rank's executor, the same on every rank: over the build's ahead-of-time engines (the folder `engines`: the
    rank's packages, their state shapes), else eager with its state sized by sequence_budget.py."""
    if engines is not None:
        return AOTExecutor(model, engines)
    max_sequences, num_pages = sequence_budget(model, max_sequences, max_length, state_memory)
    return TorchExecutor(model, max_sequences, max_length, compile=False, num_pages=num_pages)


def serve_rank(connection, build: str, moe: str, device: str, dtype: torch.dtype | None, max_sequences: int,
               max_length: int, state_memory: int | None, engines: Path | None, ready: bytes) -> None:
    """A worker rank (runtime/launcher.py's start_workers runs it): load the rank's weights, make its executor as the
    leader makes its own (rank_executor), send `ready`, run the leader's calls until the pipe closes."""
    parallel = Parallel.from_process_group(moe)
    executor = rank_executor(load_rank(build, parallel, device, dtype), max_sequences, max_length, state_memory,
                             engines)
    connection.send_bytes(ready)
    while True:
        try:
            message = torch.frombuffer(bytearray(connection.recv_bytes()), dtype=torch.long)
        except (EOFError, OSError):  # the leader closed the pipe or exited
            return
        (command, flag, n, s, l, h), body, pages = _read(message)
        if command == SPECULATE:
            executor.speculate(_decode_speculative(body, flag, n, s, l, pages, parallel, executor.device))
        elif command == WARM_UP:
            executor.warm_up(n)
        else:
            batch = _decode(body, n, s, l, pages)
            if command == FORWARD:
                executor.forward(batch)
            else:
                hidden = torch.empty(h, executor.spec.hidden_size, dtype=executor.model.dtype, device=executor.device)
                parallel.broadcast(hidden)
                executor.mtp_forward(batch, hidden)


def _message(command: int, flag: int, n: int, s: int, l: int, h: int, values,
             pages: list[tuple[int, int, list[int]]]) -> bytes:
    flat = [v for slot, first, ids in pages for v in (slot, first, len(ids), *ids)]
    return torch.tensor([command, flag, n, s, l, h, len(flat), *values, *flat], dtype=torch.long).numpy().tobytes()


def _read(message: torch.Tensor) -> tuple[list[int], torch.Tensor, list[tuple[int, int, list[int]]]]:
    """A message's header (command, flag, N, S, L, H), its body and its page updates."""
    *header, p = message[:HEADER].tolist()
    flat, pages, at = message[len(message) - p:].tolist(), [], 0
    while at < len(flat):
        slot, first, count = flat[at:at + 3]
        pages.append((slot, first, flat[at + 3:at + 3 + count]))
        at += 3 + count
    return header, message[HEADER:len(message) - p], pages


def _encode(command: int, batch: RaggedBatch, hidden_rows: int = 0) -> bytes:
    parts = [batch.token_ids, batch.query_start, batch.past_lengths, batch.slots, batch.logit_rows]
    return _message(command, 0, len(batch.token_ids), len(batch.slots), len(batch.logit_rows), hidden_rows,
                    torch.cat([p.to("cpu", torch.long) for p in parts]).tolist(), batch.pages)


def _decode(body: torch.Tensor, n: int, s: int, l: int, pages: list[tuple[int, int, list[int]]]) -> RaggedBatch:
    token_ids, query_start, past, slots, rows = body.split([n, s + 1, s, s, l])
    return RaggedBatch(token_ids, query_start, past, slots, rows, pages)


def _encode_speculative(batch: SpeculativeBatch) -> bytes:
    B, K1 = batch.token_ids.shape
    banned = torch.empty(0, 3, dtype=torch.long) if batch.banned is None else batch.banned
    ints = [batch.token_ids.flatten(), batch.num_drafts, batch.past_lengths, batch.slots, batch.top_k, banned.flatten()]
    return _message(SPECULATE, int(batch.uniforms is not None), B, K1 - 1, len(banned), 0,
                    torch.cat([t.to("cpu", torch.long) for t in ints]).tolist(), batch.pages)


def _floats(batch: SpeculativeBatch) -> torch.Tensor:
    parts = [batch.temperature, batch.top_p] + ([] if batch.uniforms is None else [batch.uniforms.flatten()])
    return torch.cat([p.to("cpu", torch.float32) for p in parts])


def _decode_speculative(body: torch.Tensor, uniforms: int, B: int, K: int, P: int,
                        pages: list[tuple[int, int, list[int]]], parallel: Parallel, device) -> SpeculativeBatch:
    ids, drafts, past, slots, top_k, banned = body.split([B * (K + 1), B, B, B, B, 3 * P])
    floats = torch.empty(2 * B + (B * (2 * K + 1) if uniforms else 0), device=device)
    parallel.broadcast(floats)
    floats = floats.cpu()
    return SpeculativeBatch(ids.view(B, K + 1), drafts, past, slots, floats[:B], top_k, floats[B:2 * B],
                            floats[2 * B:].view(B, 2 * K + 1) if uniforms else None, banned.view(P, 3) if P else None,
                            pages)
