"""`nemo3 bench`: throughput and latency of builds against BF16 and transformers' generate()."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..export.options import EXECUTORS
from .common import one_line_errors


@click.command("bench")
@click.option("--build", "builds", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Build or checkpoint folder to serve (repeatable; default: the built-in model).")
@click.option("--mtp", "mtp", multiple=True, type=int,
              help="MTP draft lengths to run each build with (repeatable; default: 0, plus 2 if the model has MTP).")
@click.option("--num-prompts", type=int, default=16, show_default=True)
@click.option("--input-len", type=int, default=64, show_default=True)
@click.option("--output-len", type=int, default=64, show_default=True)
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Times the workload runs on each build, the builds taking turns after all are loaded (figures over "
                   "all rounds: load that drifts during the run falls on every build alike).")
@click.option("--max-num-tokens", type=int, default=512, show_default=True, help="Token budget per step.")
@click.option("--no-transformers", is_flag=True, help="Skip the transformers generate() baseline.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch intra-op threads for every run (CPU: tiny models are overhead-bound; more threads add "
                   "OpenMP synchronization).")
@click.option("--compile/--eager", "compile_steps", default=True, show_default=True,
              help="Run decode steps compiled, quantized builds included (inductor on CPU, CUDA graphs on GPU; each "
                   "step shape compiles once, before timing) or eagerly.")
@click.option("--executor", "executors", multiple=True, type=click.Choice(EXECUTORS),
              help="How to run each build (repeatable, one row each): its ahead-of-time engines (aot), its TensorRT "
                   "engines (tensorrt: a --target tensorrt build, on a GPU with TensorRT), steps compiled "
                   "at load (compiled) or eager  [default: aot when the build has engines, else --compile/--eager].")
@click.option("--server", default=None, help="Benchmark a running Triton server (host:port) instead.")
@click.option("--model-name", default="nemo3", show_default=True, help="Model name on --server.")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="bench", show_default=True,
              help="Folder for bench.json, bench.md and bench.png.")
@one_line_errors
def command(builds, mtp, num_prompts, input_len, output_len, concurrency, rounds, max_num_tokens, no_transformers, device,
            threads, compile_steps, executors, server, model_name, output):
    """Run one workload on every build (and MTP setting) and on transformers, in one process."""
    import torch

    torch.set_num_threads(threads)
    from ..engines.benchmark import Target, Workload, markdown_table, plot, run_benchmark

    workload = Workload(num_prompts, input_len, output_len, concurrency)
    if server:
        from ..triton_repo.bench_client import benchmark_server

        report = benchmark_server(server, model_name, workload)
    else:
        paths = [Path(b) for b in builds] or [None]
        mtps = list(mtp) or None
        targets = [Target(p, k, executor=e) for p in paths for k in (mtps or _default_mtp(p))
                   for e in (executors or [None])]
        report = run_benchmark(targets, workload, device=device, transformers_baseline=not no_transformers,
                               max_num_tokens=max_num_tokens, compile=compile_steps, rounds=rounds, log=click.echo)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (out / "bench.md").write_text(table + "\n")
    plot(report, out / "bench.png")
    click.echo(table)
    click.echo(f"wrote {out}/bench.json, bench.md, bench.png")


def _default_mtp(path) -> list[int]:
    from ..engines.runtime.factory import DEFAULT_MTP_DRAFT_TOKENS
    from ..export.build_folder import model_folder
    from ..export.spec import ModelSpec

    return [0, DEFAULT_MTP_DRAFT_TOKENS] if ModelSpec.from_file(model_folder(path)).num_nextn_predict_layers else [0]
