"""`nemo3 plan`: per-rank weight and state memory, and how many sequences fit (export/planner.py)."""

from __future__ import annotations

import json

import click

from ..export.options import MOE_PARALLEL, PRECISIONS
from .common import one_line_errors


@click.command("plan")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint folder whose config.json to plan (default: the built-in model).")
@click.option("--preset", type=click.Choice(["nano-4b", "nano", "super", "ultra", "lightning"]), default=None,
              help="Plan a released model from its shapes alone: Nemotron 3 Nano 4B, Nano 30B-A3B, Super "
                   "120B-A12B, Ultra 550B-A55B or Nemotron 3.5 Lightning 30B-A3B (export/presets.py).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="nvfp4", show_default=True)
@click.option("--recipe", default=None,
              help="Named recipe or a YAML/JSON recipe file (default: the precision's recipe, as nemo3-build).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel ranks (one GPU each).")
@click.option("--moe-parallel", type=click.Choice(MOE_PARALLEL), default="ep", show_default=True,
              help="Split routed experts across ranks (ep) or each expert's intermediate dimension (tp).")
@click.option("--gpu-memory", default="80GiB", show_default=True,
              help="Memory of one GPU: 80GiB, 141GB, 80G (K, M, G, T alone are binary).")
@click.option("--context", default=None,
              help="Tokens per sequence: 1M (2**20), 256K, 131072 (default: the model's max_position_embeddings).")
@click.option("--kv-dtype", type=click.Choice(["fp8", "bf16"]), default=None,
              help="KV cache dtype (default: the recipe's: fp8, bf16 with --precision bf16).")
@click.option("--reserve", type=float, default=0.10, show_default=True,
              help="Fraction of GPU memory held back for CUDA context, activations and buffers.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@one_line_errors
def command(checkpoint, preset, precision, recipe, tp, moe_parallel, gpu_memory, context, kv_dtype, reserve,
            as_json):
    """Plan memory per GPU for a model at a precision, tensor parallelism and context length."""
    from ..export.builtin_config import BUILTIN_CONFIG
    from ..export.planner import format_plan, parse_bytes, parse_tokens, plan
    from ..export.presets import PRESETS
    from ..export.spec import ModelSpec
    from ..quant.recipes import load_recipe

    if checkpoint and preset:
        raise click.UsageError("give --checkpoint or --preset, not both")
    if checkpoint:
        from ..export.checkpoint import open_checkpoint

        spec, model = open_checkpoint(checkpoint).spec, checkpoint
    elif preset:
        spec, model = ModelSpec.from_config(PRESETS[preset], source=f"preset {preset}"), f"preset {preset}"
    else:
        spec, model = ModelSpec.from_config(BUILTIN_CONFIG, source="built-in model"), "built-in model"
    chosen = load_recipe(recipe or precision)

    def formats_for(p: str) -> dict[str, str]:  # the chosen recipe for --precision, the default one otherwise
        return (chosen if p == precision else load_recipe(p)).assign(spec)

    result = plan(spec, precision=precision, tp=tp, moe_parallel=moe_parallel, gpu_memory=parse_bytes(gpu_memory),
                  context=None if context is None else parse_tokens(context), kv_dtype=kv_dtype or chosen.kv_cache,
                  reserve=reserve, formats_for=formats_for, model=f"{model}, recipe {chosen.name}")
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result))
