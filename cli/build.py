"""`nemo3-build`: checkpoint -> quantized, sharded, compiled deployment with a Triton repository."""

from __future__ import annotations

import click

from ..export.options import ENGINE_DEVICES, MOE_PARALLEL, PRECISIONS, TARGETS
from .common import one_line_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="Hugging Face Nemotron 3 checkpoint folder (default: the built-in tiny model).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="deploy", show_default=True,
              help="Build folder (build.json, checkpoint/, ranks/, triton_repo/, report/).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Weight precision [default: nvfp4, or what --recipe implies; one that disagrees with --recipe "
                   "is refused].")
@click.option("--recipe", default=None,
              help="Named recipe (`nemo3 recipes` lists them: nemo3's, aliases of NVIDIA's such as nvfp4-mse and "
                   "nvfp4-w4a16, and NVIDIA's Nemotron 3 recipes shipped by ModelOpt), or a recipe file (nemo3's "
                   "YAML/JSON form or ModelOpt's).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel ranks.")
@click.option("--moe-parallel", type=click.Choice(MOE_PARALLEL), default="ep", show_default=True,
              help="Split routed experts across ranks (ep) or each expert's intermediate dimension (tp).")
@click.option("--target", type=click.Choice(TARGETS), default="torch", show_default=True,
              help="Executor the Triton repository serves.")
@click.option("--calib-data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text or JSONL (default: the train split of the built-in corpus).")
@click.option("--calib-samples", type=int, default=64, show_default=True)
@click.option("--calib-seq-len", type=int, default=256, show_default=True)
@click.option("--engines/--no-engines", default=False, show_default=True,
              help="Compile ahead-of-time engines (OUT/engines/, --target torch): serving then compiles nothing.")
@click.option("--engine-device", type=click.Choice(ENGINE_DEVICES), default=None,
              help="Where the engines run  [default: cuda where the build runs has it, else cpu].")
@click.option("--engine-max-sequences", type=int, default=16, show_default=True,
              help="Concurrent sequences the engines serve (every engine call runs this many rows).")
@click.option("--engine-max-length", type=int, default=256, show_default=True,
              help="Tokens per sequence the engines serve (the KV pages read: a dynamic dimension of each package).")
@click.option("--engine-mtp", type=int, default=None,
              help="MTP draft length the engines serve  [default: the runtime's; 0: decode steps only].")
@click.option("--engine-sampling/--no-engine-sampling", default=True, show_default=True,
              help="Also compile the sampling speculative step (else sampled MTP requests run it eagerly).")
@click.option("--engine-prefill/--no-engine-prefill", default=True, show_default=True,
              help="Also compile the prefill chunks (else prompts run eagerly).")
@click.option("--force", is_flag=True, help="Redo every stage even if build.json says it is up to date.")
@one_line_errors
def main(**kwargs):
    """Build a Nemotron 3 deployment."""
    from ..pipeline import BuildOptions, build

    kwargs["engine_prefill_tokens"] = None if kwargs.pop("engine_prefill") else ()
    build(BuildOptions(**kwargs), log=click.echo)
