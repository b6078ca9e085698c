"""Quantize a checkpoint with a recipe: what the build's "quantize" stage runs (OUT/checkpoint/).

A recipe that quantizes something is calibrated with ModelOpt (quant/calibrate.py; on CUDA when there is
one) on the calibration data (a text/JSONL file, or the built-in corpus's train split) and exported as a
unified HF checkpoint (quant/export.py). A recipe that quantizes nothing (bf16) writes the input
checkpoint in BF16 with hub names instead. `quantize_inputs` lists everything whose change must redo it:
the input checkpoint's fingerprint, the precision, the recipe's content, the calibration options (the data
file's SHA-256, or the Python version whose standard library is the corpus) and the ModelOpt version.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

from ..export.build_folder import BuildError
from ..export.checkpoint import Checkpoint
from .recipes import BF16, Recipe, layer_of


@dataclass(frozen=True)
class CalibrationOptions:
    data: Path | None = None  # None: the built-in corpus's train split
    samples: int = 64
    seq_len: int = 256


def implied_precision(recipe: Recipe, spec) -> str:
    """The --precision a recipe amounts to: its narrowest format (nvfp4 before fp8 before bf16)."""
    formats = set(recipe.assign(spec).values()) | {recipe.kv_cache}
    return next((p for p in ("nvfp4", "fp8") if any(f.startswith(p) for f in formats)), BF16)


def check_quantize_options(spec, recipe: Recipe, calibration: CalibrationOptions, tp: int = 1,
                           moe_parallel: str = "ep") -> None:
    """Before any work: the recipe fits the model, the calibration options are sane, and the quantized tensors
    split over `tp` ranks. One-line errors naming the option."""
    from ..export.planner import checkpoint_tensors
    from ..export.sharding import check_tp

    if recipe.quantizes():
        recipe.to_modelopt_quant_cfg(spec)
        for flag, value, least in (("--calib-samples", calibration.samples, 1),
                                   ("--calib-seq-len", calibration.seq_len, 2)):
            if value < least:
                raise BuildError(f"{flag} {value}: must be >= {least}")
    check_tp(spec, tp, moe_parallel, checkpoint_tensors(spec, recipe.assign(spec), recipe.kv_cache))


def _calibration_inputs(calibration: CalibrationOptions) -> dict:
    if calibration.data is None:
        data = f"built-in corpus, train split (Python {platform.python_version()} standard library)"
    else:
        data = {"file": str(calibration.data), "sha256": _file_sha256(calibration.data)}
    return {"data": data, "samples": calibration.samples, "seq_len": calibration.seq_len}


def quantize_inputs(source: Checkpoint, precision: str, recipe: Recipe, calibration: CalibrationOptions) -> dict:
    inputs = {"checkpoint": source.fingerprint(), "precision": precision, "recipe": recipe.to_dict()}
    if recipe.quantizes():
        import importlib.metadata as md

        inputs["calibration"] = _calibration_inputs(calibration)
        inputs["modelopt"] = md.version("nvidia-modelopt")
    return inputs


def quantize_checkpoint(source: Checkpoint, recipe: Recipe, calibration: CalibrationOptions, out: Path) -> dict:
    """Write the quantized checkpoint of `source` into the folder `out`; returns the summary for build.json."""
    from .export import export_quantized, export_unquantized

    if source.quantized:
        raise BuildError(f"{source.path}: the checkpoint is already quantized (hf_quant_config.json); "
                         "build from its BF16 checkpoint")
    formats = _format_counts(recipe, source.spec)
    if not recipe.quantizes():
        return {"recipe": recipe.name, "formats": formats, **export_unquantized(source, out)}
    import torch

    from .calibrate import calibrate, default_device
    from .data import calibration_windows

    check_quantize_options(source.spec, recipe, calibration)  # before the data is read
    windows, data = calibration_windows(source.path, source.spec, calibration.data, calibration.samples,
                                        calibration.seq_len)
    device = default_device()
    model = calibrate(source.path, recipe, windows, device=device)
    used = {"data": data, "samples": windows.shape[0], "seq_len": windows.shape[1], "device": device,
            "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}
    summary = export_quantized(model, source, out, {"recipe": recipe.to_dict(), "calibration": used})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"recipe": recipe.name, "formats": formats, "kv_cache": recipe.kv_cache, "calibration": used, **summary}


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
