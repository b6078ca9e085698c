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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), None)


def _spawned_rank(rank: int, fn: Callable, tp: int, backend: str, port: int, args: tuple, errors) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_WORLD_SIZE=str(tp),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = _loopback_interface()
    if backend == "gloo" and loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the ranks, as torchrun does
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
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
