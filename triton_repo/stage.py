"""The build's last stage, "triton_repo": the Triton model repository for `--target`, validated.

torch / tensorrt: the nemo3 runtime's decoupled Python model (reading the build folder, `../..`
from its model folder) plus the text-level ensemble. trtllm: TensorRT-LLM's LLM-API layout pointing
at OUT/checkpoint (the quantized unified checkpoint, which must exist by then), with the SSM cache
dtype and MTP from the model's config and the KV cache dtype from the checkpoint's hf_quant_config.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .. import __version__
from ..pipeline import BuildContext, Stage
from .generate import DEFAULT_MTP_DRAFT_TOKENS, RepositoryOptions, kv_cache_dtype_of, write_repository
from .validate import check_repository

FOLDER = "triton_repo"


def repository_options(ctx: BuildContext) -> RepositoryOptions:
    options = ctx.options
    if options.target != "trtllm":
        return RepositoryOptions(target=options.target, tp=options.tp)
    from ..export.stage import build_checkpoint

    spec = build_checkpoint(ctx).spec
    checkpoint = (ctx.out / "checkpoint").resolve()
    return RepositoryOptions(
        target="trtllm", tp=options.tp, moe_parallel=options.moe_parallel, checkpoint=checkpoint,
        kv_cache_dtype=kv_cache_dtype_of(checkpoint), mamba_ssm_cache_dtype=spec.mamba_ssm_cache_dtype,
        num_speculative_tokens=DEFAULT_MTP_DRAFT_TOKENS if spec.num_nextn_predict_layers else 0)


def triton_stage() -> Stage:
    """Stage "triton_repo" (folder triton_repo/): redone when the repository options, nemo3's version,
    the model file it copies, or the build folder's location change."""
    def depends_on(ctx: BuildContext) -> dict:
        model_py = (Path(__file__).with_name("model.py")).read_bytes()
        return {"options": dataclasses.asdict(repository_options(ctx)), "nemo3": __version__,
                "model_py": hashlib.sha256(model_py).hexdigest()[:16], "out": str(ctx.out.resolve())}

    return Stage(name="triton_repo", folder=FOLDER, depends_on=depends_on, run=_run)


def _run(ctx: BuildContext, tmp: Path | None) -> dict:
    opts = repository_options(ctx)
    models = write_repository(tmp, opts, final=ctx.out / FOLDER)
    report = check_repository(tmp, label=FOLDER, complete=False)  # TensorRT-LLM's model.py is copied later
    return {"target": opts.target, "models": models, "tp": opts.tp, "notes": report.notes}
