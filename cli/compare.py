"""`nemo3 compare BUILD... --reference REF [--throughput --plot P]`: perplexity, KL, top-1 agreement and greedy agreement vs a
reference, and with --throughput output tok/s, TTFT, TPOT and resident weights in the same table."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import one_line_errors

_folder = click.Path(exists=True, file_okay=False)


@click.command("compare")
@click.argument("builds", nargs=-1, required=True, type=_folder)
@click.option("--reference", required=True, type=_folder,
              help="The BF16 build or checkpoint folder the builds are scored against.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
@click.option("--sequences", type=int, default=16, show_default=True, help="Held-out windows scored.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per window.")
@click.option("--prompts", type=int, default=8, show_default=True, help="Greedy continuations compared.")
@click.option("--prompt-len", type=int, default=32, show_default=True, help="Tokens of each prompt.")
@click.option("--gen-tokens", type=int, default=32, show_default=True, help="Tokens of each greedy continuation.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--throughput", is_flag=True,
              help="Also serve the reference and every build (nemo3 bench's default workload, compiled decode steps, "
                   "one torch thread on CPU): output tok/s, TTFT, TPOT and resident weights in the same table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="With --throughput: write a tokens/s vs KL plot (PNG) here.")
@one_line_errors
def command(builds, reference, json_path, throughput, plot_path, **options):
    """Score BUILDS (build or checkpoint folders) against --reference on held-out text."""
    from ..engines.evaluation.compare import CompareOptions, add_throughput, compare, format_table, plot

    if plot_path and not throughput:
        raise click.UsageError("--plot needs --throughput")
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    report = compare([Path(b) for b in builds], Path(reference), CompareOptions(**options), log=log)
    if throughput:
        import torch

        from ..engines.benchmark import Target, Workload, run_benchmark

        if options["device"] == "cpu":
            torch.set_num_threads(1)
        targets = [Target(Path(p)) for p in (reference, *builds)]
        add_throughput(report, run_benchmark(targets, Workload(), device=options["device"],
                                             transformers_baseline=False, log=log))
        if plot_path:
            plot(report, Path(plot_path))
            log(f"wrote {plot_path}")
    click.echo(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
