"""Long context on CPU with the built-in model: a decode step's cost follows the real length, not max_length.

    python benchmarks/long_context.py [--compile] [--steps 32] [--threads 1]

1. Decode tokens/s of one sequence at context 1k in an engine of max_length 4k and in one of max_length 256k,
   in one run, their steps alternating (with a paged KV cache both read the same pages: the ratio should be
   within 10% of 1).
2. The decode step time at 1k and 32k context against what the step must read: the K and V of every position
   of each attention layer plus the weights, over the memory bandwidth a large copy measures in the same run.
   The context is set up directly in the pages (random K/V; a decode step's cost does not depend on them),
   so no 32k prefill is needed.

Medians over --steps decode steps. With --compile the steps run compiled (inductor), one graph per bound on the
pages read (engines/executors/compiled_step.py); without it they run eagerly, as `nemo3 generate` does on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nemo3.engines.executors.base import RaggedBatch
from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.export.builtin import BUILTIN_DIR
from nemo3.export.kv_pages import pages_for


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB copy (read + write counted), the best of five."""
    src = torch.randn(2**26)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_step_s(model, max_lengths: list[int], context: int, steps: int, compile: bool) -> list[float]:
    """Median seconds of a decode step of one sequence that has `context` tokens, in one engine per max_length;
    the engines' steps alternate, so that a change in the machine's load affects them alike."""
    executors = []
    for max_length in max_lengths:
        executor = TorchExecutor(model, 1, max_length, compile=compile)
        g = torch.Generator().manual_seed(0)
        for entry in executor.state.layers.values():
            if hasattr(entry, "pages"):  # a context of random K/V
                entry.k.copy_(torch.randn(entry.k.shape, generator=g))
                entry.v.copy_(torch.randn(entry.v.shape, generator=g))
        pages = list(range(pages_for(context + 1, executor.page_size)))
        executor.forward(RaggedBatch.build([([1], context, 0)], [0], pages=[(0, 0, pages)]))  # warm-up / compile
        executors.append(executor)
    times: list[list[float]] = [[] for _ in executors]
    for i in range(steps):
        batch = RaggedBatch.build([([3 + i % 50], context, 0)], [0])  # rewrites position `context` each step
        for executor, spent in zip(executors, times):
            spent.append(timed(lambda: executor.forward(batch)))
    return [statistics.median(spent) for spent in times]


def step_bytes(model, context: int) -> tuple[int, int]:
    """(K/V bytes, weight bytes) a decode step of one sequence reads: every backbone attention layer's K and V at
    `context` positions, and the backbone's weights (the lm_head included, the embedding's one row not)."""
    spec = model.spec
    kv = spec.layer_types.count("*") * 2 * spec.num_key_value_heads * spec.head_dim * model.dtype.itemsize * context
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if not name.startswith(("mtp.", "backbone.embeddings")))
    return kv, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (inductor) instead of eager")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as the tests run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(BUILTIN_DIR)
    mode = "compiled" if args.compile else "eager"
    print(f"built-in model, {mode} decode, {args.threads} thread(s), torch {torch.__version__}\n")

    short, long = decode_step_s(model, [4096, 262144], 1024, args.steps, args.compile)
    print("| context | max_length | decode tok/s |\n|---:|---:|---:|")
    print(f"| 1,024 | 4,096 | {1 / short:.1f} |\n| 1,024 | 262,144 | {1 / long:.1f} |")
    print(f"\nmax_length 256k / 4k: {short / long:.2f}x the tokens/s\n")

    gbs = copy_bandwidth()
    print(f"memory bandwidth (copy): {gbs:.1f} GB/s\n")
    print("| context | step ms | K/V MiB | weights MiB | bytes / bandwidth ms | step / that |\n|---:|---:|---:|---:|---:|---:|")
    for context in (1024, 32768):
        step = short if context == 1024 else decode_step_s(model, [context + 64], context, args.steps, args.compile)[0]
        kv, weights = step_bytes(model, context)
        floor = (kv + weights) / gbs / 1e9
        print(f"| {context:,} | {1e3 * step:.2f} | {kv / 2**20:.1f} | {weights / 2**20:.1f} | {1e3 * floor:.2f} "
              f"| {step / floor:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
