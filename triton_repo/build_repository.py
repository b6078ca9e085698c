"""The Triton model repository a build writes (OUT/triton_repo/), validated: what the build's "triton_repo"
stage runs.

torch / tensorrt: the nemo3 runtime's decoupled Python model (reading the build folder, `../..` from its
model folder) plus the text-level ensemble. trtllm: TensorRT-LLM's LLM-API layout pointing at OUT/checkpoint
(the quantized unified checkpoint, which must exist by then), with the SSM cache dtype and MTP from the
model's config and the KV cache dtype from the checkpoint's hf_quant_config.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .. import __version__
from ..export.spec import ModelSpec
from .generate import DEFAULT_MTP_DRAFT_TOKENS, RepositoryOptions, kv_cache_dtype_of, write_repository
from .validate import check_repository


def repository_options(target: str, tp: int, moe_parallel: str, spec: ModelSpec, checkpoint: Path
                       ) -> RepositoryOptions:
    """The repository for `target`; `checkpoint` is the build's quantized checkpoint (what trtllm serves)."""
    if target != "trtllm":
        return RepositoryOptions(target=target, tp=tp)
    checkpoint = checkpoint.resolve()
    return RepositoryOptions(
        target="trtllm", tp=tp, moe_parallel=moe_parallel, checkpoint=checkpoint,
        kv_cache_dtype=kv_cache_dtype_of(checkpoint), mamba_ssm_cache_dtype=spec.mamba_ssm_cache_dtype,
        num_speculative_tokens=DEFAULT_MTP_DRAFT_TOKENS if spec.num_nextn_predict_layers else 0)


def repository_inputs(opts: RepositoryOptions, final: Path) -> dict:
    """What must redo the repository when it changes: its options, nemo3's version, the model file it copies and
    where the build folder is."""
    model_py = Path(__file__).with_name("model.py").read_bytes()
    return {"options": dataclasses.asdict(opts), "nemo3": __version__,
            "model_py": hashlib.sha256(model_py).hexdigest()[:16], "out": str(final.parent.resolve())}


def write_validated_repository(opts: RepositoryOptions, tmp: Path, final: Path) -> dict:
    """Write the repository into `tmp` (it will be renamed to `final`) and validate it; the summary for build.json."""
    models = write_repository(tmp, opts, final=final)
    report = check_repository(tmp, label=final.name, complete=False)  # TensorRT-LLM's model.py is copied later
    return {"target": opts.target, "models": models, "tp": opts.tp, "notes": report.notes}
