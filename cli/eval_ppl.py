"""`nemo3 eval-ppl [PATH]`: held-out loss, perplexity, bits per byte, MTP agreement, unigram baseline."""

from __future__ import annotations

import json

import click

from .common import checkpoint_argument, one_line_errors


@click.command("eval-ppl")
@checkpoint_argument
@click.option("--window", type=int, default=256, show_default=True, help="Tokens per evaluation window.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward.")
@click.option("--max-files", type=int, default=None, help="Evaluate only the first N held-out files.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@one_line_errors
def command(path, window, batch_size, max_files, device, threads, as_json):
    """Evaluate the checkpoint at PATH (default: the built-in model) on the held-out Python stdlib files."""
    import torch

    from ..engines.evaluation.heldout import evaluate_heldout, format_result
    from ..export.tokenizer import load_tokenizer
    from ..engines.network.loading import load
    from ..export.builtin import resolve_checkpoint

    if threads:
        torch.set_num_threads(threads)
    folder = resolve_checkpoint(path)
    result = evaluate_heldout(load(folder, device=device), load_tokenizer(folder), window, batch_size, max_files)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_result(result))
