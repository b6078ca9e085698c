"""The build: a sequence of stages, each writing one folder of OUT/ atomically.

Before any stage runs, every stage checks the options against the model (`Stage.check`: --tp
against the ModelSpec, the recipe against the model and --precision, ...), so a bad option fails
in seconds, not after hours of quantization; and OUT/ must be a writable folder. Every stage
writes into `OUT/.tmp-<stage>` and is renamed into place only when complete, so an interrupted
build never leaves a half-written stage that a later run trusts (a rerun removes what an
interrupted one left). `OUT/build.json` records, per stage, the hash of everything the stage
depends on (input fingerprint + options); a stage whose hash matches and whose folder exists is
skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

PRECISIONS = ("bf16", "fp8", "nvfp4")
DEFAULT_PRECISION = "nvfp4"
TMP_PREFIX = ".tmp-"
TARGETS = ("torch", "tensorrt", "trtllm")


class BuildError(RuntimeError):
    """A build that cannot go on; the message says which input or option is at fault."""


@dataclass
class BuildOptions:
    output: Path
    checkpoint: Path | None = None  # None: the built-in model
    precision: str | None = None  # None: what --recipe implies (quant/stage.py), nvfp4 without a recipe
    recipe: str | None = None  # None: the precision's default recipe
    tp: int = 1
    moe_parallel: str = "ep"
    target: str = "torch"
    calib_data: Path | None = None
    calib_samples: int = 64
    calib_seq_len: int = 256
    force: bool = False

    def __post_init__(self):
        self.output = Path(self.output)
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
        if self.precision is None and self.recipe is None:
            self.precision = DEFAULT_PRECISION
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BuildError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.target not in TARGETS:
            raise BuildError(f"--target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.target == "tensorrt":
            raise BuildError("--target tensorrt: the ONNX + TensorRT engine path is not built yet; "
                             "use --target torch (nemo3 runtime) or --target trtllm (TensorRT-LLM)")
        if self.moe_parallel not in ("ep", "tp"):
            raise BuildError(f"--moe-parallel {self.moe_parallel!r}: expected ep or tp")
        if self.tp < 1:
            raise BuildError(f"--tp {self.tp}: must be >= 1")


@dataclass
class Stage:
    """One step of the build. `run(ctx, tmp)` fills the folder `tmp`, which becomes OUT/<folder>."""

    name: str
    folder: str | None  # None: a stage that only checks and records (no folder of its own)
    depends_on: Callable[["BuildContext"], dict]  # everything whose change must redo the stage
    run: Callable[["BuildContext", Path | None], dict | None]  # returns a summary recorded in build.json
    # checks the options against the model before any stage runs (may settle an option); returns a note or None
    check: Callable[["BuildContext"], str | None] | None = None


@dataclass
class BuildContext:
    options: BuildOptions
    record: dict = field(default_factory=dict)  # build.json content
    cache: dict = field(default_factory=dict)  # objects shared between stages of one run

    @property
    def out(self) -> Path:
        return self.options.output

    @property
    def checkpoint_path(self) -> Path:
        from .export.builtin import builtin_model_path

        return self.options.checkpoint or builtin_model_path()

    def stage_dir(self, folder: str) -> Path:
        return self.out / folder


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_record(out: Path) -> dict:
    path = out / "build.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a corrupt record is treated as no record: every stage is redone


def _write_record(out: Path, record: dict) -> None:
    tmp = out / "build.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, out / "build.json")


def prepare_output(out: Path) -> None:
    """Make OUT/ a writable folder (one-line BuildError otherwise) and remove what interrupted runs left."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise BuildError(f"--output {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    for stale in out.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def run_stages(ctx: BuildContext, stages: list[Stage], log: Callable[[str], None] = print) -> dict:
    out = ctx.out
    for stage in stages:  # every option against the model, before anything is written or computed
        note = stage.check(ctx) if stage.check is not None else None
        if note:
            log(f"[{stage.name}] {note}")
    prepare_output(out)
    previous = _read_record(out)
    ctx.record = {
        "nemo3_version": __version__,
        "options": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in dataclasses.asdict(ctx.options).items() if k != "force"},
        "versions": _versions(),
        "stages": {},
    }
    for stage in stages:
        key = stable_hash(stage.depends_on(ctx))
        old = previous.get("stages", {}).get(stage.name, {})
        final = out / stage.folder if stage.folder else None
        if not ctx.options.force and old.get("hash") == key and (final is None or final.exists()):
            log(f"[{stage.name}] up to date, skipped")
            ctx.record["stages"][stage.name] = old
            continue
        tmp = None
        if final is not None:
            tmp = out / f"{TMP_PREFIX}{stage.folder.replace('/', '_')}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        log(f"[{stage.name}] running")
        start = time.perf_counter()
        summary = stage.run(ctx, tmp) or {}
        if final is not None:
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        seconds = round(time.perf_counter() - start, 3)
        ctx.record["stages"][stage.name] = {"hash": key, "seconds": seconds, **summary}
        _write_record(out, ctx.record)  # after each stage: an interrupted build keeps what completed
        log(f"[{stage.name}] done in {seconds:.1f}s")
    _write_record(out, ctx.record)
    return ctx.record


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "nvidia-modelopt", "triton", "tritonclient", "safetensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def build_stages(options: BuildOptions) -> list[Stage]:
    """The stages, in order: read -> quantize -> shard -> triton_repo -> report."""
    from .export.shard_stage import shard_stage
    from .export.stage import read_stage
    from .quant.stage import quantize_stage, report_stage
    from .triton_repo.stage import triton_stage

    return [read_stage(), quantize_stage(), shard_stage(), triton_stage(), report_stage()]


def build(options: BuildOptions, log: Callable[[str], None] = print) -> dict:
    ctx = BuildContext(options)
    return run_stages(ctx, build_stages(options), log=log)
