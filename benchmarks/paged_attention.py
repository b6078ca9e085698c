"""The paged decode attention kernel on one GPU: achieved bandwidth against the device's copy bandwidth.

    python benchmarks/paged_attention.py [--contexts 16K,128K,1M] [--batches 1,8] [--kv bf16,fp8] [--prompt 1M]
    python benchmarks/paged_attention.py --dry-run    # CPU: runs every part tiny (numbers mean nothing)

Nemotron 3 attention shapes (32 query heads, 2 KV heads, head_dim 128, pages of 64 tokens scattered at
random over the pool). For each context, batch and KV dtype it prints one Markdown table row: the kernel's
median time replayed in a CUDA graph (the grid is fixed by the block table's width; the work follows the
real lengths), the bytes a decode step must read (K and V of every position, the queries, the block table and
the output), those bytes over the time, that bandwidth as a fraction of a device-to-device copy measured in
the same run (the goal: >= 80%), and the relative error against the plain-torch reference at the shorter
contexts. Then the built-in model with a --prompt-token prompt (chunked prefill over pages, one sequence): time
to first token and decode tokens/s. Without CUDA it says that a GPU is needed and exits 0; --dry-run runs the
same code on the CPU at 1K context (fp32 pages for bf16) and a 2K prompt, the kernel in Triton's interpreter,
timed by the clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from kernels import bench_graph, copy_bandwidth, rel_err

from nemo3.engines.runtime.factory import StackOptions, open_scheduler
from nemo3.engines.runtime.requests import GenerationParams
from nemo3.export.kv_pages import DEFAULT_PAGE_SIZE, pages_for
from nemo3.export.planner import parse_tokens
from nemo3.plugins.paged_attention import FP8, paged_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128
REFERENCE_UP_TO = 2**17  # the eager reference is slow at long contexts: checked at the shorter ones only
PREFILL_CHUNK = 8192  # prompt tokens per step (max_num_tokens) for the --prompt measurement
DECODE_TOKENS = 64


def clock_ms(fn, repeat: int = 3) -> float:
    """Median wall milliseconds of fn() (the --dry-run stand-in for a CUDA-graph replay)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cpu_copy_bandwidth() -> float:
    src = torch.randn(2**24)
    return 2 * src.numel() * 4 / clock_ms(lambda: torch.empty_like(src).copy_(src)) / 1e6


def row(context: int, batch: int, kv: str, copy_gbs: float, dev: str = "cuda") -> str:
    page = DEFAULT_PAGE_SIZE
    per_row = pages_for(context, page)
    num_pages = batch * per_row
    fp8 = kv == "fp8"
    act = torch.float32 if dev == "cpu" else torch.bfloat16  # Triton 3.9's interpreter gets bf16 tl.dot wrong
    k_pages = torch.randn(num_pages, page, KV_HEADS, HEAD_DIM, device=dev, dtype=act)
    v_pages = torch.randn_like(k_pages)
    scales = {}
    if fp8:
        scales = dict(k_scale=torch.tensor(0.01, device=dev), v_scale=torch.tensor(0.01, device=dev))
        k_pages, v_pages = (k_pages * 20).to(FP8), (v_pages * 20).to(FP8)
    table = torch.randperm(num_pages, device=dev, dtype=torch.int32).view(batch, per_row)
    seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=dev, dtype=act)
    args = (q, k_pages, v_pages, table, seq_lens, HEAD_DIM ** -0.5)
    out = paged_attention(*args, **scales, impl="triton")
    err = (f"{rel_err([(out, paged_attention(*args, **scales, impl='reference'))]):.1e}"
           if context <= REFERENCE_UP_TO else "n/a")
    ms = (bench_graph if dev == "cuda" else clock_ms)(lambda: paged_attention(*args, **scales, impl="triton"))
    moved = (2 * batch * context * KV_HEADS * HEAD_DIM * k_pages.element_size()  # K and V
             + 2 * q.numel() * q.element_size() + table.numel() * 4)          # queries, output, block table
    gbs = moved / ms / 1e6
    return (f"| {context:,} | {batch} | {kv} | {1e3 * ms:.1f} | {moved / 2**20:.1f} | {gbs:.0f} "
            f"| {100 * gbs / copy_gbs:.0f}% | {err} |")


def prompt_row(tokens: int, dev: str) -> str:
    """The built-in model, one sequence: a `tokens`-token prompt prefilled in chunks, then DECODE_TOKENS tokens."""
    chunk = min(PREFILL_CHUNK, tokens)
    scheduler = open_scheduler(None, StackOptions(device=dev, max_sequences=1, max_length=tokens + DECODE_TOKENS,
                                                  max_num_tokens=chunk))
    prompt = torch.randint(3, scheduler.executor.spec.vocab_size, (tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    start, first, count = time.perf_counter(), None, 0
    for delta in scheduler.stream(prompt, GenerationParams(max_tokens=DECODE_TOKENS, ignore_eos=True)):
        if first is None and delta.token_ids:
            first = time.perf_counter()
        count += len(delta.token_ids)
    end = time.perf_counter()
    return (f"| {tokens:,} | {chunk:,} | {first - start:.1f} | "
            f"{(count - 1) / (end - first):.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="16K,128K,1M", help="comma-separated tokens per sequence")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--kv", default="bf16,fp8", help="comma-separated KV dtypes (bf16, fp8)")
    parser.add_argument("--prompt", default="1M", help="prompt tokens for the built-in model's time to first token")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke test: 1K context, batch 1, fp32/fp8 pages, a 2K prompt, the kernel in Triton's "
                        "interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported (at the first call)
        args.contexts, args.batches, args.prompt, args.kv = "1K", "1", "2K", "fp32,fp8"
        dev, copy_gbs = "cpu", cpu_copy_bandwidth()
        print(f"DRY RUN on the CPU (numbers mean nothing): copy {copy_gbs:.1f} GB/s\n")
    elif not torch.cuda.is_available():
        print("benchmarks/paged_attention.py: needs a CUDA GPU (none found); nothing measured.")
        return 0
    else:
        dev, copy_gbs = "cuda", copy_bandwidth()
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s; decode (T=1), "
              f"{HEADS} query / {KV_HEADS} KV heads x {HEAD_DIM}, pages of {DEFAULT_PAGE_SIZE} tokens\n")
    print("| context | batch | KV | in graph µs | MiB read | GB/s | % of copy | rel. error |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for context in (parse_tokens(c, "--contexts") for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for kv in args.kv.split(","):
                print(row(context, batch, kv, copy_gbs, dev), flush=True)
                torch.cuda.empty_cache()
    print("\nbuilt-in model, one sequence\n\n| prompt tokens | prefill chunk | time to first token s | decode tok/s |")
    print("|---:|---:|---:|---:|")
    print(prompt_row(parse_tokens(args.prompt, "--prompt"), dev), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
