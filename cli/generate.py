"""`nemo3 generate [PATH] PROMPT`: stream a completion to the terminal."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command("generate")
@click.argument("prompt")
@click.option("--checkpoint", "--build", "path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint or build folder (default: the built-in model); a --tp N build runs on N ranks, "
                   "this process leading the N - 1 it starts.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no limit.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Makes sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--mtp", "mtp", type=int, default=0, show_default=True,
              help="MTP speculative decoding: draft this many tokens per step (0: off).")
@click.option("--think-budget", type=int, default=None, help="Force </think> after this many thinking tokens.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--compile", "compile_steps", is_flag=True,
              help="Run decode steps compiled (inductor on CPU, CUDA graphs on GPU): each step shape compiles once "
                   "at start-up (tens of seconds on CPU), which pays off for long generations.")
@click.option("--stats", is_flag=True, help="Print token counts, latency and MTP acceptance at the end.")
@one_line_errors
def command(prompt, path, max_tokens, temperature, top_k, top_p, seed, stop, mtp, think_budget, device, compile_steps,
            stats):
    """Generate a continuation of PROMPT, streaming it as it is produced."""
    from ..engines.runtime.factory import StackOptions, open_scheduler
    from ..engines.runtime.requests import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop=tuple(stop), think_budget=think_budget, num_speculative_tokens=mtp)
    engine = open_scheduler(path, StackOptions(device=device, max_sequences=1,
                                               max_length=max_tokens + mtp + 1 + 4 * len(prompt) + 8,
                                               compile=compile_steps, num_speculative_tokens=mtp))
    if engine.executor.kind in ("aot", "tensorrt"):
        click.echo(f"(decode steps: the {engine.executor.kind} engines of {path})", err=True)
    click.echo(prompt, nl=False)
    last = None
    try:  # (Ctrl-C included: a --tp N build's worker ranks stop with it)
        for delta in engine.stream(prompt, params):
            click.echo(delta.text, nl=False)
            last = delta
    finally:
        engine.executor.close()
    click.echo()
    if stats and last is not None:
        for key, value in last.stats.items():
            if key != "inter_token_latencies_s":
                click.echo(f"{key}: {value}", err=True)
