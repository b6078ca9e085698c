"""The paged decode attention kernel on one GPU: achieved bandwidth against the device's copy bandwidth.

    python benchmarks/paged_attention.py [--contexts 16K,128K,1M] [--batches 1,8] [--kv bf16,fp8]

Nemotron 3 attention shapes (32 query heads, 2 KV heads, head_dim 128, pages of 64 tokens scattered at
random over the pool). For each context, batch and KV dtype it prints one Markdown table row: the kernel's
median time replayed in a CUDA graph (the grid is fixed by the block table's width; the work follows the
real lengths), the bytes a decode step must read (K and V of every position, the queries, the block table and
the output), those bytes over the time, that bandwidth as a fraction of a device-to-device copy measured in
the same run (the goal: >= 80%), and the relative error against the plain-torch reference at the shorter
contexts. Without CUDA it says that a GPU is needed and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch
from kernels import bench_graph, copy_bandwidth, rel_err

from nemo3.export.kv_pages import DEFAULT_PAGE_SIZE, pages_for
from nemo3.export.planner import parse_tokens
from nemo3.plugins.paged_attention import FP8, paged_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128
REFERENCE_UP_TO = 2**17  # the reference materializes every row's keys: checked at the shorter contexts only


def row(context: int, batch: int, kv: str, copy_gbs: float) -> str:
    dev, page = "cuda", DEFAULT_PAGE_SIZE
    per_row = pages_for(context, page)
    num_pages = batch * per_row
    fp8 = kv == "fp8"
    k_pages = torch.randn(num_pages, page, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    scales = {}
    if fp8:
        scales = dict(k_scale=torch.tensor(0.01, device=dev), v_scale=torch.tensor(0.01, device=dev))
        k_pages, v_pages = (k_pages * 20).to(FP8), (v_pages * 20).to(FP8)
    table = torch.randperm(num_pages, device=dev, dtype=torch.int32).view(batch, per_row)
    seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    args = (q, k_pages, v_pages, table, seq_lens, HEAD_DIM ** -0.5)
    out = paged_attention(*args, **scales, impl="triton")
    err = (f"{rel_err([(out, paged_attention(*args, **scales, impl='reference'))]):.1e}"
           if context <= REFERENCE_UP_TO else "n/a")
    ms = bench_graph(lambda: paged_attention(*args, **scales, impl="triton"))
    moved = (2 * batch * context * KV_HEADS * HEAD_DIM * k_pages.element_size()  # K and V
             + 2 * q.numel() * q.element_size() + table.numel() * 4)          # queries, output, block table
    gbs = moved / ms / 1e6
    return (f"| {context:,} | {batch} | {kv} | {1e3 * ms:.1f} | {moved / 2**20:.1f} | {gbs:.0f} "
            f"| {100 * gbs / copy_gbs:.0f}% | {err} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="16K,128K,1M", help="comma-separated tokens per sequence")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--kv", default="bf16,fp8", help="comma-separated KV dtypes (bf16, fp8)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/paged_attention.py: needs a CUDA GPU (none found); nothing measured.")
        return 0
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s; decode (T=1), "
          f"{HEADS} query / {KV_HEADS} KV heads x {HEAD_DIM}, pages of {DEFAULT_PAGE_SIZE} tokens\n")
    print("| context | batch | KV | in graph µs | MiB read | GB/s | % of copy | rel. error |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for context in (parse_tokens(c, "--contexts") for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for kv in args.kv.split(","):
                print(row(context, batch, kv, copy_gbs), flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
