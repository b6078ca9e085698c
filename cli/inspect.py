"""`nemo3 inspect [PATH] [--json]`: what a checkpoint is (layers, parameters, MoE, state sizes, dtypes)."""

from __future__ import annotations

import json

import click

from .common import checkpoint_argument, one_line_errors


@click.command("inspect")
@checkpoint_argument
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def command(path, as_json):
    """Describe the checkpoint at PATH (default: the built-in model)."""
    from ..export.builtin import resolve_checkpoint
    from ..export.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(resolve_checkpoint(path))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
