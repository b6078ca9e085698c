"""The build's precision stages: "quantize" (OUT/checkpoint/) and "report" (OUT/report/).

quantize: the recipe is `load_recipe(--recipe or --precision)`. A recipe that quantizes something is
calibrated with ModelOpt (quant/calibrate.py; on CUDA when there is one) on `--calib-data` or the
built-in corpus's train split, and exported as a unified HF checkpoint (quant/export.py). A recipe
that quantizes nothing (bf16) writes the input checkpoint in BF16 with hub names instead. Redone
when the input checkpoint's fingerprint, the precision, the recipe's content, the calibration
options (the data file's SHA-256, or the Python version whose standard library is the corpus) or
the ModelOpt version change.

report: the build's checkpoint against the BF16 reference, the input checkpoint evaluated
unquantized (quant/compare.py with its default options): accuracy.json and accuracy.md; the
numbers also go into build.json. A checkpoint without tokenizer.json gets a note instead (the
held-out text cannot be encoded). Redone when the quantize stage was redone or the input changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

from ..pipeline import BuildContext, BuildError, Stage
from .compare import CompareOptions, compare, format_table
from .recipes import Recipe, layer_of, load_recipe

CHECKPOINT_FOLDER = "checkpoint"
REPORT_FOLDER = "report"


def build_recipe(ctx: BuildContext) -> Recipe:
    if "recipe" not in ctx.cache:
        ctx.cache["recipe"] = load_recipe(ctx.options.recipe or ctx.options.precision)
    return ctx.cache["recipe"]


# ---- quantize --------------------------------------------------------------------------------------------
def quantize_stage() -> Stage:
    return Stage(name="quantize", folder=CHECKPOINT_FOLDER, depends_on=_quantize_inputs, run=_quantize)


def _calibration_inputs(ctx: BuildContext) -> dict:
    options = ctx.options
    if options.calib_data is None:
        data = f"built-in corpus, train split (Python {platform.python_version()} standard library)"
    else:
        data = {"file": str(options.calib_data), "sha256": _file_sha256(options.calib_data)}
    return {"data": data, "samples": options.calib_samples, "seq_len": options.calib_seq_len}


def _quantize_inputs(ctx: BuildContext) -> dict:
    from ..export.stage import build_checkpoint

    recipe = build_recipe(ctx)
    inputs = {"checkpoint": build_checkpoint(ctx).fingerprint(), "precision": ctx.options.precision,
              "recipe": recipe.to_dict()}
    if recipe.quantizes():
        import importlib.metadata as md

        inputs["calibration"] = _calibration_inputs(ctx)
        inputs["modelopt"] = md.version("nvidia-modelopt")
    return inputs


def _quantize(ctx: BuildContext, tmp: Path | None) -> dict:
    from ..export.stage import build_checkpoint
    from .export import export_quantized, export_unquantized

    source = build_checkpoint(ctx)
    recipe = build_recipe(ctx)
    if source.quantized:
        raise BuildError(f"{source.path}: the checkpoint is already quantized (hf_quant_config.json); "
                         "build from its BF16 checkpoint")
    formats = _format_counts(recipe, source.spec)
    if not recipe.quantizes():
        return {"recipe": recipe.name, "formats": formats, **export_unquantized(source, tmp)}
    import torch

    from .calibrate import calibrate, default_device
    from .data import calibration_windows

    options = ctx.options
    for flag, value, least in (("--calib-samples", options.calib_samples, 1),
                               ("--calib-seq-len", options.calib_seq_len, 2)):
        if value < least:
            raise BuildError(f"{flag} {value}: must be >= {least}")
    recipe.to_modelopt_quant_cfg(source.spec)  # a recipe that does not fit the model fails before the data is read
    windows, data = calibration_windows(source.path, source.spec, options.calib_data, options.calib_samples,
                                        options.calib_seq_len)
    device = default_device()
    model = calibrate(source.path, recipe, windows, device=device)
    calibration = {"data": data, "samples": windows.shape[0], "seq_len": windows.shape[1], "device": device,
                   "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}
    summary = export_quantized(model, source, tmp, {"recipe": recipe.to_dict(), "calibration": calibration})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"recipe": recipe.name, "formats": formats, "kv_cache": recipe.kv_cache, "calibration": calibration,
            **summary}


def _format_counts(recipe: Recipe, spec) -> dict[str, int]:
    """How many linear layers get each format."""
    counts: dict[str, int] = {}
    for name, fmt in recipe.assign(spec).items():
        if layer_of(name):
            counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- report ----------------------------------------------------------------------------------------------
def report_stage(options: CompareOptions = CompareOptions()) -> Stage:
    def depends_on(ctx: BuildContext) -> dict:
        from ..export.stage import build_checkpoint

        quantize = ctx.record.get("stages", {}).get("quantize", {}).get("hash")
        return {"quantize": quantize, "reference": build_checkpoint(ctx).fingerprint(),
                "options": dataclasses.asdict(options)}

    def run(ctx: BuildContext, tmp: Path | None) -> dict:
        return _report(ctx, tmp, options)

    return Stage(name="report", folder=REPORT_FOLDER, depends_on=depends_on, run=run)


def _report(ctx: BuildContext, tmp: Path, options: CompareOptions) -> dict:
    built = ctx.stage_dir(CHECKPOINT_FOLDER)
    if not built.is_dir():
        raise BuildError(f"{built}: no checkpoint to report on (the quantize stage writes it)")
    if not (ctx.checkpoint_path / "tokenizer.json").is_file():
        note = f"not measured: {ctx.checkpoint_path} has no tokenizer.json to encode the held-out text with"
        (tmp / "accuracy.md").write_text(f"# Accuracy of this build ({build_recipe(ctx).name})\n\n{note}\n")
        return {"accuracy": None, "note": note}
    import torch

    if options.device == "cpu" and torch.cuda.is_available():
        options = dataclasses.replace(options, device="cuda")
    report = compare([built], ctx.checkpoint_path, options, log=lambda _: None)
    row = report["builds"][0]
    row["label"] = f"{build_recipe(ctx).name} (this build)"
    (tmp / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "accuracy.md").write_text(
        f"# Accuracy of this build ({build_recipe(ctx).name}) against the unquantized input checkpoint\n\n"
        f"{format_table(report)}\n")
    return {"accuracy": {"perplexity": row["perplexity"], "reference_perplexity": report["reference"]["perplexity"],
                         "kl_mean": row["kl_mean"], "kl_p99": row["kl_p99"], "top1_agreement": row["top1_agreement"],
                         "greedy_prefix": row["greedy_prefix"], "gen_tokens": options.gen_tokens}}
