"""Sharding a checkpoint at full Nano width: time against plain reading of the same files, and peak memory.

    python benchmarks/convert.py [--pattern M*E] [--tp 4] [--moe ep,tp] [--repeats 3] [--workdir /tmp]

Writes a synthetic BF16 checkpoint with Nemotron 3 Nano's real widths (hidden 2688, vocab 131072, 64
Mamba heads, 32/2 attention heads, 128 experts of 1856) but only the layers of `--pattern` (default
`M*E`: one Mamba, one attention and one MoE layer, about 4.1 GB) in two shards with an index, as the
hub does. Then, `--repeats` times and interleaved, each in a fresh child process:

* read:  read every safetensors file of the checkpoint from start to end (64 MiB reads);
* copy:  write each file's bytes to a new file, from a memory map of it as the rank writer does: the
         floor for a conversion that writes what it reads (sharding writes the input once more, plus
         the replicated tensors once per rank);
* shard: export.rank_writer.write_ranks at `--tp` for each `--moe` mode.

Outputs go to a folder removed after each run; dirty pages are flushed (os.sync) before each run,
untimed, so the times count writing into the page cache, not the previous run's writeback. Prints one Markdown row per case: the median seconds
of the work (imports excluded), input bytes per second, the ratios to plain reading and to copying,
and the child's peak resident memory (VmHWM, which counts the pages of memory-mapped files it
touched) next to its resident memory before the work began. Needs about 2.2x the checkpoint's size
in free disk; everything is removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 64 * 2**20


def _status(key: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# ---- child processes -------------------------------------------------------------------------------------
def child(args) -> None:
    """Do one measured piece of work and print {seconds, rss_before, peak_rss} as JSON."""
    from nemo3.export.rank_writer import write_ranks  # torch and the reader load before the baseline

    rss_before = _status("VmRSS")
    start = time.perf_counter()
    if args.child == "read":
        buffer = bytearray(CHUNK)
        for f in sorted(Path(args.source).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
    elif args.child == "copy":  # as the rank writer writes: from the input's memory map into the output file
        Path(args.out).mkdir()
        for f in sorted(Path(args.source).glob("*.safetensors")):
            with open(f, "rb") as fh, open(Path(args.out) / f.name, "wb") as out:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    for offset in range(0, len(mapped), CHUNK):
                        out.write(view[offset:offset + CHUNK])
                    view.release()
    else:
        write_ranks(args.source, args.out, args.tp, args.child.removeprefix("shard-"))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before": rss_before, "peak_rss": _status("VmHWM")}))


def run_child(kind: str, source: Path, out: Path | None, tp: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--source", str(source), "--tp", str(tp)]
    if out is not None:
        command += ["--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the synthetic checkpoint -----------------------------------------------------------------------------
def nano_spec(pattern: str):
    from nemo3.export.presets import NANO_CONFIG
    from nemo3.export.spec import ModelSpec

    return ModelSpec.from_config({**NANO_CONFIG, "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)},
                                 source=f"Nano widths, pattern {pattern}")


def write_synthetic(spec, folder: Path, shards: int = 2) -> int:
    """Random BF16 tensors (fp32 router biases) of every expected tensor, in `shards` files + index."""
    import torch

    from nemo3.export.names import expected_tensors, fp32_tensors
    from nemo3.export.safetensors_writer import SafetensorsWriter, tensor_bytes

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.to_config(), indent=2))
    tensors = [(name, torch.float32 if fp32_tensors(name) else torch.bfloat16, shape)
               for name, shape in expected_tensors(spec).items()]
    total = sum(tensor_bytes(dtype, shape) for _, dtype, shape in tensors)
    groups, size = [[]], 0
    for entry in tensors:  # cut into shards of about total / shards bytes
        if size >= total / shards and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += tensor_bytes(entry[1], entry[2])
    block = torch.randn(2**22, generator=torch.Generator().manual_seed(0))
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(folder / file, group) as writer:
            for name, dtype, shape in group:
                n = math.prod(shape)
                writer.write(name, block.to(dtype).repeat(math.ceil(n / block.numel()))[:n].reshape(shape))
                weight_map[name] = file
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


# ---- main -----------------------------------------------------------------------------------------------------
def main(args) -> None:
    from nemo3.export.names import expected_tensors

    spec = nano_spec(args.pattern)
    size = sum(math.prod(s) for s in expected_tensors(spec).values()) * 2
    work = Path(tempfile.mkdtemp(prefix="nemo3-convert-", dir=args.workdir))
    try:
        free = shutil.disk_usage(work).free
        if free < 2.2 * size:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the benchmark needs about {2.2 * size / 1e9:.1f} GB")
        print(f"writing a {size / 1e9:.2f} GB checkpoint (Nano widths, pattern {args.pattern}) to {work}", flush=True)
        source = work / "checkpoint"
        write_synthetic(spec, source)
        cases = ["read", "copy"] + [f"shard-{mode}" for mode in args.moe.split(",")]
        results = {case: [] for case in cases}
        run_child("read", source, None, args.tp)  # warm the page cache: every case reads cached files
        for repeat in range(args.repeats):
            for case in cases:
                out = work / "out" if case != "read" else None
                os.sync()  # start with no dirty pages, so a case does not pay for the previous one's writeback
                results[case].append(run_child(case, source, out, args.tp))
                if out is not None:
                    shutil.rmtree(out)
                print(f"  repeat {repeat + 1}/{args.repeats} {case}: {results[case][-1]['seconds']:.2f} s", flush=True)
        median = {case: statistics.median(r["seconds"] for r in results[case]) for case in cases}
        print(f"\ncheckpoint {size / 1e9:.2f} GB, --tp {args.tp}, median of {args.repeats}\n")
        print("| case | seconds | input GB/s | / plain read | / plain copy | peak RSS MiB | RSS before MiB |")
        print("|---|---|---|---|---|---|---|")
        for case in cases:
            seconds = median[case]
            peak = max(r["peak_rss"] for r in results[case])
            before = statistics.median(r["rss_before"] for r in results[case])
            label = {"read": "plain read", "copy": "plain copy"}.get(
                case, f"shard tp {args.tp}, moe {case.removeprefix('shard-')}")
            print(f"| {label} | {seconds:.2f} | {size / seconds / 1e9:.2f} | {seconds / median['read']:.2f} | "
                  f"{seconds / median['copy']:.2f} | {peak / 2**20:.0f} | {before / 2**20:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="M*E", help="layers to include, at full Nano width")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--moe", default="ep,tp", help="routed-expert modes to shard with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="folder for the temporary checkpoint (default: system temp)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    child(arguments) if arguments.child else main(arguments)
