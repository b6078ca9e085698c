"""`nemo3 validate-repo DIR`: check a Triton model repository the way Triton would load it."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command("validate-repo")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@one_line_errors
def command(folder):
    """Parse every config.pbtxt into Triton's ModelConfig and check ensembles, files and model.yaml."""
    from ..triton_repo.validate import validate_repository

    report = validate_repository(folder)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for error in report.errors:
        click.echo(f"error: {error}", err=True)
    if report.errors:
        raise click.ClickException(f"{folder}: {len(report.errors)} problem(s); the first: {report.errors[0]}")
    click.echo(f"{folder}: ok ({', '.join(sorted(report.models))})")
