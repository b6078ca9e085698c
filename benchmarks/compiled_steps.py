"""The compiled steps of several builds, timed in one process: the decode step and a prefill chunk.

    python benchmarks/compiled_steps.py BF16 FP8 NVFP4 [--context 128] [--chunk 64] [--rounds 30]

Each argument is a build folder (`nemo3-build --precision bf16|fp8|nvfp4 --output ...`) or a checkpoint folder. Every
build is opened as `nemo3 bench` opens it (compiled steps, `--rows` sequences) and its steps are compiled first; then
the builds take turns, `--rounds` times: 20 decode steps (the attention reading the pages of `--context` tokens per
row) and 2 prefill chunks (`--chunk` tokens per row), on padding rows (slot -1: static shapes, so the same graph and
work as real rows, and no state written). It prints one Markdown row per build
and step, min and median milliseconds and their ratio to the first build. Serving throughput is `nemo3 bench`'s; this
isolates what a build's compiled graphs cost (quantizers, FP8 pages) from the scheduler around them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemo3.engines.executors.compiled_step import backbone_step, prefill_step
from nemo3.engines.runtime.factory import StackOptions, open_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", help="build or checkpoint folders; ratios are to the first")
    parser.add_argument("--rows", type=int, default=8, help="sequences per step (max_sequences)")
    parser.add_argument("--context", type=int, default=128, help="tokens whose pages a decode step reads")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per row of a prefill chunk (16, 64 or 256)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    calls = {}
    with torch.inference_mode():
        for build in args.builds:
            engine = open_scheduler(build, StackOptions(device="cpu", max_sequences=args.rows,
                                                        max_length=args.context + 1,
                                                        max_num_tokens=args.rows * args.chunk, compile=True))
            steps = engine.executor.compiled
            if steps is None:
                raise SystemExit(f"{build}: its steps do not compile on this machine")
            calls[build] = [(steps, step, tokens, steps.padding_args(step, T))
                            for step, T, tokens in ((prefill_step, args.chunk, args.chunk),
                                                    (backbone_step, 1, args.context))]
            for steps, step, tokens, step_args in calls[build]:
                steps.read_pages(tokens)
                steps.backbone(*step_args)  # compiles
        times = {(build, step.__name__): [] for build, row in calls.items() for _, step, _, _ in row}
        for _ in range(args.rounds):
            for build, row in calls.items():
                for steps, step, tokens, step_args in row:
                    steps.read_pages(tokens)
                    for _ in range(2 if step is prefill_step else 20):
                        start = time.perf_counter()
                        steps.backbone(*step_args)
                        times[build, step.__name__].append(time.perf_counter() - start)
    print(f"| build | step | min ms | median ms | min vs {args.builds[0]} | median vs {args.builds[0]} |")
    print("|---|---|---:|---:|---:|---:|")
    for (build, step), ts in times.items():
        base = times[args.builds[0], step]
        print(f"| {build} | {step} | {min(ts) * 1e3:.3f} | {statistics.median(ts) * 1e3:.3f} | "
              f"{min(ts) / min(base):.3f} | {statistics.median(ts) / statistics.median(base):.3f} |")


if __name__ == "__main__":
    main()
