"""Tensor-parallel execution: the leader's `Executor` drives every rank's network through one call.

The leader process (rank 0) runs the Scheduler over a `DistributedExecutor`. Each call (forward,
mtp_forward, commit_steps, warm_up) is sent to the worker ranks over their pipes before the leader
runs its own part, so every rank runs the same call on its part of the network and the collectives
inside it (engines/network/parallel.py) meet. The logits are all-gathered: the leader samples from
its own copy and the workers' results are dropped.

    leader  -> worker   one message per call: an int64 vector [command, keep_steps, N, S, L, H, token ids (N),
                        query starts (S+1), past lengths (S), slots (S), logit rows (L)] (commit_steps: the slots
                        and the steps kept); an MTP call's hidden rows [H, D] follow as a broadcast from rank 0
                        on the network's device (gloo on CPU, NCCL on GPU)

No message is pickled. A worker runs `serve_rank`: it loads its rank's weights, reports READY and
executes calls until its pipe closes (the leader closed or exited). When a rank dies, hangs past the
process group's timeout or raises, the call in progress raises `RankFailure` with one line naming the
rank, and every later call raises it at once: the ranks cannot continue without each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..network.loading import load_rank
from ..network.parallel import Parallel
from .base import ForwardOutput, RaggedBatch
from .torch_executor import TorchExecutor

FORWARD, MTP_FORWARD, COMMIT, WARM_UP = 1, 2, 3, 4
HEADER = 6  # command, keep_steps, N, S, L, H


class RankFailure(RuntimeError):
    """The ranks can no longer run together; the message (one line) says which rank and why."""


class DistributedExecutor:
    """The Executor protocol over tensor-parallel ranks; `local` runs rank 0's part. `workers` is
    runtime/launcher.py's `Workers` (their pipes, failure(), close())."""

    def __init__(self, local: TorchExecutor, workers):
        self.local, self.workers = local, workers
        self.spec, self.has_mtp, self.model, self.compiled = local.spec, local.has_mtp, local.model, local.compiled
        self.max_sequences, self.max_length = local.max_sequences, local.max_length
        self._failure: str | None = None

    def forward(self, batch: RaggedBatch) -> ForwardOutput:
        return self._call(_encode(FORWARD, batch), lambda: self.local.forward(batch))

    def mtp_forward(self, batch: RaggedBatch, hidden: torch.Tensor) -> ForwardOutput:
        def run():
            rows = hidden.to(self.local.device, self.local.model.dtype).contiguous()
            self.local.model.parallel.broadcast(rows)
            return self.local.mtp_forward(batch, rows)

        return self._call(_encode(MTP_FORWARD, batch, hidden.shape[0]), run)

    def commit_steps(self, slots: list[int], keep: list[int]) -> None:
        self._call(_message(COMMIT, 0, len(slots), 0, 0, 0, slots + keep), lambda: self.local.commit_steps(slots, keep))

    def warm_up(self, max_tokens: int) -> None:
        self._call(_message(WARM_UP, 0, max_tokens, 0, 0, 0, []), lambda: self.local.warm_up(max_tokens))

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


def serve_rank(connection, build: str, moe: str, device: str, dtype: torch.dtype | None, max_sequences: int,
               max_length: int, ready: bytes) -> None:
    """A worker rank (runtime/launcher.py's start_workers runs it): load the rank's weights, send `ready`, run
    the leader's calls until the pipe closes."""
    parallel = Parallel.from_process_group(moe)
    executor = TorchExecutor(load_rank(build, parallel, device, dtype), max_sequences, max_length, compile=False)
    connection.send_bytes(ready)
    while True:
        try:
            message = torch.frombuffer(bytearray(connection.recv_bytes()), dtype=torch.long)
        except (EOFError, OSError):  # the leader closed the pipe or exited
            return
        command, keep_steps, n, s, l, h = message[:HEADER].tolist()
        body = message[HEADER:]
        if command == COMMIT:
            executor.commit_steps(body[:n].tolist(), body[n:].tolist())
        elif command == WARM_UP:
            executor.warm_up(n)
        else:
            batch = _decode(body, n, s, l, bool(keep_steps))
            if command == FORWARD:
                executor.forward(batch)
            else:
                hidden = torch.empty(h, executor.spec.hidden_size, dtype=executor.model.dtype, device=executor.device)
                parallel.broadcast(hidden)
                executor.mtp_forward(batch, hidden)


def _message(command: int, keep_steps: int, n: int, s: int, l: int, h: int, values) -> bytes:
    return torch.tensor([command, keep_steps, n, s, l, h, *values], dtype=torch.long).numpy().tobytes()


def _encode(command: int, batch: RaggedBatch, hidden_rows: int = 0) -> bytes:
    parts = [batch.token_ids, batch.query_start, batch.past_lengths, batch.slots, batch.logit_rows]
    header = torch.tensor([command, int(batch.keep_steps), len(batch.token_ids), len(batch.slots),
                           len(batch.logit_rows), hidden_rows], dtype=torch.long)
    return torch.cat([header] + [p.to("cpu", torch.long) for p in parts]).numpy().tobytes()


def _decode(body: torch.Tensor, n: int, s: int, l: int, keep_steps: bool) -> RaggedBatch:
    token_ids, query_start, past, slots, rows = body.split([n, s + 1, s, s, l])
    return RaggedBatch(token_ids, query_start, past, slots, rows, keep_steps)
