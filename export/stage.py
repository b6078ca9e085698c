"""The build's first stage, "read": open the checkpoint, check it against its config, record what it is."""

from __future__ import annotations

from pathlib import Path

from ..pipeline import BuildContext, Stage
from .checkpoint import Checkpoint, open_checkpoint
from .inspect import parameter_counts


def build_checkpoint(ctx: BuildContext) -> Checkpoint:
    """The build's checkpoint, opened once per run and shared by every stage (`ctx.cache["checkpoint"]`)."""
    if "checkpoint" not in ctx.cache:
        ctx.cache["checkpoint"] = open_checkpoint(ctx.checkpoint_path)
    return ctx.cache["checkpoint"]


def read_stage() -> Stage:
    """Stage "read" (no folder): validates names, shapes and dtypes from the safetensors headers.

    Redone when the checkpoint's fingerprint changes (config, index, tokenizer files, safetensors headers
    and sizes; see `Checkpoint.fingerprint`)."""
    return Stage(name="read", folder=None,
                 depends_on=lambda ctx: {"checkpoint": build_checkpoint(ctx).fingerprint()},
                 run=_read)


def _read(ctx: BuildContext, tmp: Path | None) -> dict:
    ckpt = build_checkpoint(ctx)
    ckpt.validate()
    spec = ckpt.spec
    return {"checkpoint": str(ckpt.path.resolve()), "fingerprint": ckpt.fingerprint(), "pattern": spec.pattern,
            "mtp_pattern": spec.mtp_pattern, "tensors": len(ckpt.names()), "parameters": parameter_counts(spec)}
