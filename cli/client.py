"""`nemo3 client [--url localhost:8001] PROMPT...`: stream completions from a Triton server over gRPC."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command("client")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--url", default="localhost:8001", show_default=True, help="Triton gRPC endpoint (host:port).")
@click.option("--model", default="ensemble", show_default=True, help="Model to query.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--min-tokens", type=int, default=None,
              help="No end of sequence or stop before this many tokens (nemo3 targets).")
@click.option("--temperature", type=float, default=None, help="0: greedy (the server's default when not given).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", "stop_words", multiple=True, help="Stop string (repeatable).")
@click.option("--think-budget", type=int, default=None, help="nemo3: max tokens inside <think>...</think>.")
@click.option("--num-speculative-tokens", type=int, default=None, help="nemo3: MTP draft length (0: off).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds for a whole completion.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Requests in flight (several prompts).")
@click.option("--stats", is_flag=True, help="Print token counts, acceptance length and time per completion.")
@one_line_errors
def command(prompts, url, model, timeout, concurrency, stats, stop_words, **options):
    """Send PROMPTS; one prompt is streamed as it is generated, several run concurrently."""
    from ..triton_repo.client import RequestOptions, TextClient

    client = TextClient(url, model, timeout=timeout)
    if len(prompts) == 1:
        request = RequestOptions(stop_words=stop_words, **options)
        with client.stream(prompts[0], request) as generation:
            last = None
            for chunk in generation:
                click.echo(chunk.text, nl=False)
                last = chunk
        click.echo()
        if stats and last is not None:
            click.echo(_stats(last.finish_reason, last.num_input_tokens, last.num_output_tokens,
                              last.acceptance_length), err=True)
        return
    request = RequestOptions(stop_words=stop_words, stream=False, **options)
    for i, done in enumerate(client.generate_many(list(prompts), request, concurrency=concurrency)):
        click.echo(f"[{i}] {done.text}")
        if stats:
            click.echo(f"[{i}] " + _stats(done.finish_reason, done.num_input_tokens, done.num_output_tokens,
                                          done.acceptance_length) + f", {done.seconds:.2f} s", err=True)


def _stats(reason, n_in, n_out, acceptance) -> str:
    parts = [f"finish: {reason or '?'}"]
    if n_in is not None:
        parts.append(f"input tokens: {n_in}")
    if n_out is not None:
        parts.append(f"output tokens: {n_out}")
    if acceptance:
        parts.append(f"acceptance length: {acceptance:.2f}")
    return ", ".join(parts)
