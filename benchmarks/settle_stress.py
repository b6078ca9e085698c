"""Stress `Parallel.settle` (engines/network/parallel.py): how many rounds of eager gloo collectives followed by an
AOTInductor package's all-reduce two CPU ranks run before a hang, if any.

    python benchmarks/settle_stress.py [--rounds 100000] [--busy 4] [--timeout-s 20]

A package holds the GIL while it waits at its collectives; a gloo thread still letting go of an eager collective's
Python tensor needs the GIL: a rank that starts the package too early hangs, and the other rank's next collective
times out. Each round: a broadcast and an all-gather through `Parallel` (eager, lent), `settle()`, then a package
with one all-reduce (compiled once, in a temporary folder). `--busy N` runs N busy-looping processes beside the ranks
(a loaded machine, as CI's two test workers make it, widens the window). Prints the rounds done, or the round and the
error at which a rank stopped (with a hang: gloo's timeout, after --timeout-s seconds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from nemo3.engines.network.parallel import Parallel
from nemo3.engines.runtime.launcher import free_port


class AllReduce(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c10d = torch.ops._c10d_functional
        return c10d.wait_tensor(c10d.all_reduce(x * 2, "sum", dist.group.WORLD.group_name)) + 1


def compile_package(path: Path) -> None:
    """The one-all-reduce package, compiled in a process group of one rank (the package names the group, "0")."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    program = torch.export.export(AllReduce(), (torch.ones(8),))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    dist.destroy_process_group()


def rank_rounds(rank: int, port: int, package: str, rounds: int, timeout_s: float) -> None:
    """One of two ranks (torch.multiprocessing.spawn), in a process group whose collectives time out after timeout_s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    parallel = Parallel.from_process_group("tp")
    runner = torch._C._aoti.AOTIModelPackageLoader(package, "model", True, 1, -1)
    start, done = time.perf_counter(), 0
    try:
        for done in range(rounds):
            parallel.broadcast(torch.ones(8))
            parallel.all_gather(torch.ones(8))
            parallel.settle()
            out = runner.boxed_run([torch.ones(8)])[0]
            if out[0].item() != 2 * world + 1:
                raise RuntimeError(f"the package's all-reduce gave {out[0].item()}")
    except Exception as error:
        print(f"rank {rank}: stopped at round {done}: {str(error).splitlines()[0]}", flush=True)
        os._exit(1)  # (the other rank may hang where it is: the spawner stops it)
    if rank == 0:
        print(f"{rounds} rounds in {time.perf_counter() - start:.0f} s, no hang", flush=True)


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(100_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--busy", type=int, default=4, help="busy-looping processes beside the ranks")
    parser.add_argument("--timeout-s", type=float, default=20.0, help="gloo's timeout: a hang shows after it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "all_reduce.pt2"
        compile_package(package)
        hogs = [multiprocessing.Process(target=busy, args=(24 * 3600,), daemon=True) for _ in range(args.busy)]
        for hog in hogs:
            hog.start()
        try:
            torch.multiprocessing.spawn(rank_rounds, args=(free_port(), str(package), args.rounds, args.timeout_s),
                                        nprocs=2)
        finally:
            for hog in hogs:
                hog.kill()


if __name__ == "__main__":
    sys.exit(main())
