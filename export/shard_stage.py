"""The build stage "shard": OUT/ranks/rank{r}/ (model.safetensors + config.json) for every rank of --tp.

Its input is the build's quantized checkpoint, OUT/checkpoint/, when an earlier stage of the build
wrote one, else the input checkpoint itself. It is redone when that input's fingerprint, --tp,
--moe-parallel or the rank format changes.
"""

from __future__ import annotations

from pathlib import Path

from ..pipeline import BuildContext, Stage
from .checkpoint import CONFIG_FILE, open_checkpoint
from .rank_writer import RANK_FORMAT, write_ranks
from .sharding import check_tp
from .stage import build_checkpoint


def shard_stage() -> Stage:
    return Stage(name="shard", folder="ranks", depends_on=_depends_on, run=_run, check=_check)


def _check(ctx: BuildContext) -> None:
    """--tp and --moe-parallel against the model, before any stage runs (the quantize stage checks the
    quantized tensors' split too)."""
    check_tp(build_checkpoint(ctx).spec, ctx.options.tp, ctx.options.moe_parallel)


def shard_source(ctx: BuildContext) -> Path:
    """OUT/checkpoint when the build wrote one, else the input checkpoint."""
    built = ctx.stage_dir("checkpoint")
    return built if (built / CONFIG_FILE).is_file() else ctx.checkpoint_path


def _depends_on(ctx: BuildContext) -> dict:
    source = shard_source(ctx)
    return {"source": str(source.resolve()), "fingerprint": open_checkpoint(source).fingerprint(),
            "tp": ctx.options.tp, "moe_parallel": ctx.options.moe_parallel, "format": RANK_FORMAT}


def _run(ctx: BuildContext, tmp: Path | None) -> dict:
    return write_ranks(shard_source(ctx), tmp, ctx.options.tp, ctx.options.moe_parallel)
