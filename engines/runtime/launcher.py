"""Starting the ranks of a tensor-parallel run: spawned here, or already started by torchrun.

    launch(fn, tp=4, backend="gloo", args=(checkpoint,))

runs fn(*args) on each of `tp` ranks with torch.distributed initialized (gloo on CPU; NCCL on GPU,
one GPU per rank: cuda:LOCAL_RANK). Inside, `Parallel.from_process_group(moe)` is the rank's context.

* Under torchrun (RANK and WORLD_SIZE in the environment, with LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT) this process is one of the ranks: the process group is initialized from the
  environment (WORLD_SIZE must equal tp) and fn runs here, e.g.
  `torchrun --nproc-per-node 4 --no-python nemo3 run --tp 4 "prompt"`.
* Otherwise `tp` processes are spawned (torch.multiprocessing, start method spawn). They meet at
  127.0.0.1 on a free port, with the same environment variables torchrun would set, and gloo's
  connections use the loopback interface: a run never reaches beyond this machine.
* tp 1 outside torchrun runs fn here, without torch.distributed.

A rank that raises ends the run: the spawner stops the other ranks and raises a RuntimeError naming
the rank that failed first and its error (the others' errors, such as a connection reset by the
failed rank, follow from it), chained to the traceback spawn reports.

A serving process instead stays rank 0 and starts the others as workers it talks to:

    workers = start_workers(fn, tp=4, backend="gloo", args=(build,), timeout=timedelta(seconds=60))
    ...                      # rank 0's own preparation (loading its weights), while the workers prepare theirs
    workers.wait_ready()

runs fn(connection, *args) on ranks 1..tp-1 (child processes, spawn) and joins their process group as
rank 0 here; `wait_ready` returns once every worker reported that fn is ready to serve (`READY`, sent
by fn). Either raises with the first failing rank's one-line error. `connection` is the worker's end of a pipe
to this process; a worker whose pipe closes (this process exited) stops. Workers run as many torch
threads as this process. `timeout` bounds every collective: a rank that hangs makes the others'
collectives raise after it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch

TIMEOUT = timedelta(minutes=10)  # how long a rank waits for the others at one collective


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(fn: Callable, tp: int, backend: str = "gloo", args: tuple = ()) -> None:
    """Run fn(*args) on every rank of a `tp`-rank process group (module docstring)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp {tp!r}: must be a positive integer")
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise ValueError(f"--tp {tp}, but torchrun started WORLD_SIZE={world} processes")
        _run_rank(fn, tp, backend, args)
    elif tp == 1:
        fn(*args)
    else:
        import torch.multiprocessing as mp
        from torch.multiprocessing.spawn import ProcessException

        if backend == "nccl" and torch.cuda.device_count() < tp:
            raise ValueError(f"--tp {tp} with NCCL needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
        errors = mp.get_context("spawn").SimpleQueue()  # (time, rank, message) of each rank that raised
        try:
            mp.spawn(_spawned_rank, args=(fn, tp, backend, free_port(), args, errors), nprocs=tp, join=True)
        except ProcessException as e:
            failures = []
            while not errors.empty():
                failures.append(errors.get())
            _, rank, message = min(failures, default=(0, e.error_index, _one_line(e)))  # e.g. a killed rank
            raise RuntimeError(f"rank {rank} of {tp} failed: {message}") from e


READY = b"ready"  # what a worker sends when it can serve
_STARTED, _FAILED = b"started", b"failed:"  # (worker -> leader, before the rendezvous / with a one-line error)
STOP_GRACE_S = 5.0  # how long close() waits for a worker to exit before killing it
START_TIMEOUT_S = 120.0  # for a worker to start (import torch and nemo3)
READY_TIMEOUT_S = 3600.0  # for a worker to be ready to serve (load its weights)
DEATH_WAIT_S = 5.0  # how long a failed collective waits to see whether a worker's exit caused it


class Workers:
    """Ranks 1..tp-1 of this process's process group, in child processes (see the module docstring)."""

    def __init__(self, processes: list, connections: list):
        self.processes, self.connections = processes, connections
        self.reported: dict[int, str] = {}  # rank -> the one-line error it sent before exiting

    @property
    def tp(self) -> int:
        return len(self.processes) + 1

    def failure(self, error: BaseException | None = None) -> str | None:
        """Why the ranks can no longer serve: the first worker that exited, with its error; else `error` (what a
        collective raised: a timeout, ...) in one line; None while they can. With an `error`, a worker whose
        exit caused it is given DEATH_WAIT_S to be seen exiting."""
        import multiprocessing.connection as mpc

        if error is not None:
            ended = mpc.wait([p.sentinel for p in self.processes], DEATH_WAIT_S)
            for process in self.processes:  # (a dying process's sentinel closes a moment before it can be reaped)
                if process.sentinel in ended:
                    process.join(DEATH_WAIT_S)
        for rank, (process, connection) in enumerate(zip(self.processes, self.connections), start=1):
            if not process.is_alive():
                self._read_reports(rank, connection)
                why = self.reported.get(rank, f"exit code {process.exitcode}")
                return f"rank {rank} of {self.tp} exited ({why})"
        return None if error is None else _one_line(error)

    def wait_for(self, message: bytes, timeout: float, what: str) -> None:
        """Wait until every worker sent `message`; RuntimeError naming the first rank that failed instead."""
        import multiprocessing.connection as mpc

        waiting, deadline = set(range(1, self.tp)), time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"ranks {sorted(waiting)} of {self.tp} did not get {what} within {timeout:.0f} s")
            objects = [self.connections[r - 1] for r in waiting] + [self.processes[r - 1].sentinel for r in waiting]
            for ready in mpc.wait(objects, left):
                rank = next((r for r in waiting if ready in (self.connections[r - 1], self.processes[r - 1].sentinel)),
                            None)
                if rank is None:  # (both ends of a rank that just got through)
                    continue
                got = self._receive(rank, self.connections[rank - 1]) if ready is self.connections[rank - 1] else None
                if got == message:
                    waiting.discard(rank)
                elif got is None:
                    self.processes[rank - 1].join(STOP_GRACE_S)
                    raise RuntimeError(self.failure() or f"rank {rank} of {self.tp} stopped before {what}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until every worker sent READY; on failure (or after `timeout` seconds) stop them all and raise a
        RuntimeError naming the first rank that failed."""
        try:
            self.wait_for(READY, timeout, "ready")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers (they exit when their pipe closes; killed if they do not within STOP_GRACE_S) and
        leave the process group. Leaves no process behind."""
        import torch.distributed as dist

        for connection in self.connections:
            connection.close()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _receive(self, rank: int, connection) -> bytes | None:
        """The worker's next message; a failure report is recorded (and None returned), as is a closed pipe."""
        try:
            message = connection.recv_bytes()
        except (EOFError, OSError):
            return None
        if message.startswith(_FAILED):
            self.reported[rank] = message[len(_FAILED):].decode()
            return None
        return message

    def _read_reports(self, rank: int, connection) -> None:
        try:
            while not connection.closed and connection.poll():
                if self._receive(rank, connection) is None:
                    break
        except (EOFError, OSError):
            pass


def start_workers(fn: Callable, tp: int, backend: str, args: tuple = (), timeout: timedelta = TIMEOUT) -> Workers:
    """Start ranks 1..tp-1 running fn(connection, *args) and join their process group as rank 0 (module
    docstring). On failure, every started process is stopped and a RuntimeError names the first failing rank
    and its error."""
    import multiprocessing as mp

    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group; it can lead one multi-rank model")
    if backend == "nccl" and torch.cuda.device_count() < tp:
        raise ValueError(f"--tp {tp} with NCCL needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
    context, port = mp.get_context("spawn"), free_port()
    processes, connections = [], []
    for rank in range(1, tp):
        mine, theirs = context.Pipe()
        processes.append(context.Process(target=_worker_rank, name=f"nemo3-rank{rank}", daemon=True,
                                         args=(rank, fn, tp, backend, port, timeout, torch.get_num_threads(),
                                               args, theirs)))
        connections.append(mine)
        processes[-1].start()
        theirs.close()
    workers = Workers(processes, connections)
    try:
        workers.wait_for(_STARTED, START_TIMEOUT_S, "started")
        loopback = _loopback_interface()  # (no RANK etc. here: this process is not a torchrun rank)
        if backend == "gloo" and loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=tp, rank=0,
                                timeout=timeout)
    except BaseException:
        workers.close()
        raise
    return workers


def _set_rank_environment(rank: int, tp: int, port: int, backend: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_WORLD_SIZE=str(tp),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = _loopback_interface()
    if backend == "gloo" and loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the ranks, as torchrun does
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))


def _worker_rank(rank: int, fn: Callable, tp: int, backend: str, port: int, timeout: timedelta, threads: int,
                 args: tuple, connection) -> None:
    import torch.distributed as dist

    try:
        connection.send_bytes(_STARTED)
        _set_rank_environment(rank, tp, port, backend)
        torch.set_num_threads(threads)  # as many as the leader's
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method="env://", world_size=tp, rank=rank, timeout=timeout)
        fn(connection, *args)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the leader reports it
        pass
    except BaseException as e:  # noqa: BLE001 - whatever stops the rank is reported to the leader in one line
        try:
            connection.send_bytes(_FAILED + _one_line(e).encode())
        except OSError:  # the leader is gone
            pass
        raise SystemExit(1) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), None)


def _spawned_rank(rank: int, fn: Callable, tp: int, backend: str, port: int, args: tuple, errors) -> None:
    _set_rank_environment(rank, tp, port, backend)
    try:
        _run_rank(fn, tp, backend, args)
    except BaseException as e:
        errors.put((time.monotonic(), rank, _one_line(e)))
        raise


def _run_rank(fn: Callable, tp: int, backend: str, args: tuple) -> None:
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, init_method="env://", world_size=tp, rank=int(os.environ["RANK"]),
                            timeout=TIMEOUT)
    fn(*args)
    # (not after an error: the connections stay up until this rank's error is recorded and it exits)
    dist.destroy_process_group()


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
