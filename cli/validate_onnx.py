"""`nemo3 validate-onnx OUT`: run a --target tensorrt build's ONNX graphs on CPU against the torch executor."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command("validate-onnx")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@one_line_errors
def command(out):
    """Check every graph of OUT/engines/tensorrt (onnx.checker with the nemo3 schemas, plugin attributes) and run it
    in onnx's reference evaluator (nemo3 nodes through the plugins' references) against the torch executor."""
    from ..engines.executors.tensorrt_folder import validate_tensorrt_folder
    from ..engines.network.loading import load
    from ..export.build_folder import BuildFolder, model_folder

    results = validate_tensorrt_folder(load(model_folder(out)), BuildFolder(out).tensorrt, log=click.echo)
    click.echo(f"{out}: ok ({len(results)} graphs equal the torch executor to fp32 rounding)")
