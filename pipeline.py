"""The build: a sequence of stages, each writing one folder of OUT/ atomically.

The stages' work is done by plain library functions (export: read_summary, write_ranks; quant:
quantize_checkpoint; engines/executors: build_engines, write_tensorrt_folder; triton_repo: write_validated_repository;
engines/evaluation: write_report); this module
alone wraps them into stages, opens the checkpoint once per run and hands it to them.

Before any stage runs, every stage checks the options against the model (`Stage.check`: --tp against the
ModelSpec, the recipe against the model and --precision, ...), so a bad option fails in seconds, not after
hours of quantization; and OUT/ must be a writable folder. Every stage writes into `OUT/.tmp-<stage>` and is
renamed into place only when complete, so an interrupted build never leaves a half-written stage that a later
run trusts (a rerun removes what an interrupted one left). `OUT/build.json` records, per stage, the hash of
everything the stage depends on (input fingerprint + options); a stage whose hash matches and whose folder
exists is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from . import __version__
from .export.build_folder import BuildError, BuildFolder
from .export.options import DEFAULT_PRECISION, ENGINE_DEVICES, MOE_PARALLEL, PRECISIONS, TARGETS

TMP_PREFIX = ".tmp-"


@dataclass
class BuildOptions:
    output: Path
    checkpoint: Path | None = None  # None: the built-in model
    precision: str | None = None  # None: what --recipe implies (quant/quantize.py), nvfp4 without a recipe
    recipe: str | None = None  # None: the precision's default recipe
    tp: int = 1
    moe_parallel: str = "ep"
    target: str = "torch"
    calib_data: Path | None = None
    calib_samples: int = 64
    calib_seq_len: int = 256
    # ahead-of-time engines (the engines stage; False: it records that they were not asked for)
    engines: bool = False
    engine_device: str | None = None  # None: cuda when the build runs where CUDA is available, else cpu
    engine_max_sequences: int = 16  # rows of every engine call (concurrent sequences served)
    engine_max_length: int = 256  # tokens per sequence (the pages a row reads: a dynamic dimension of each package)
    engine_mtp: int | None = None  # MTP draft length the engines serve (None: the runtime's default; 0: decode only)
    engine_sampling: bool = True  # also the sampling speculative step
    engine_prefill_tokens: tuple[int, ...] | None = None  # prefill chunk lengths (None: compiled_step's; (): none)
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
        if self.target == "tensorrt" and self.tp > 1:
            raise BuildError(f"--target tensorrt --tp {self.tp}: per-rank ONNX graphs are not built yet (a rank's "
                             "all-reduce would have to be a node of the graph); use --tp 1")
        if self.moe_parallel not in MOE_PARALLEL:
            raise BuildError(f"--moe-parallel {self.moe_parallel!r}: expected one of {', '.join(MOE_PARALLEL)}")
        if self.tp < 1:
            raise BuildError(f"--tp {self.tp}: must be >= 1")
        self._check_engine_options()

    def _check_engine_options(self) -> None:
        import torch

        if self.engine_device is None:
            self.engine_device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.engine_device not in ENGINE_DEVICES:
            raise BuildError(f"--engine-device {self.engine_device!r}: expected one of {', '.join(ENGINE_DEVICES)}")
        if self.engines and self.engine_device == "cuda" and not torch.cuda.is_available():
            raise BuildError("--engine-device cuda: no CUDA device here; engines are compiled where they run")
        for name in ("engine_max_sequences", "engine_max_length"):
            if getattr(self, name) < 1:
                raise BuildError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.engine_mtp is not None and self.engine_mtp < 0:
            raise BuildError(f"--engine-mtp {self.engine_mtp}: must be >= 0")


@dataclass
class Stage:
    """One step of the build. `run(build, tmp)` fills the folder `tmp`, which becomes OUT/<folder>."""

    name: str
    folder: str | None  # a BuildFolder attribute; None: a stage that only checks and records
    inputs: Callable[["Build"], dict]  # everything whose change must redo the stage
    run: Callable[["Build", Path | None], dict]  # returns a summary recorded in build.json
    # checks the options against the model before any stage runs (may settle an option); returns a note or None
    check: Callable[["Build"], str | None] | None = None
    applies: Callable[["BuildOptions"], bool] | None = None  # None: always; else whether the build runs the stage


@dataclass
class Build:
    """One run of the build: its options, its folder, and what its stages share (opened once)."""

    options: BuildOptions
    record: dict = field(default_factory=dict)  # build.json content, filled as stages complete

    @property
    def folder(self) -> BuildFolder:
        return BuildFolder(self.options.output)

    @property
    def checkpoint_path(self) -> Path:
        from .export.builtin import resolve_checkpoint

        return resolve_checkpoint(self.options.checkpoint)

    @cached_property
    def checkpoint(self):
        """The input checkpoint (export.checkpoint.Checkpoint), opened once and handed to every stage."""
        from .export.checkpoint import open_checkpoint

        return open_checkpoint(self.checkpoint_path)

    @cached_property
    def recipe(self):
        from .quant.recipes import load_recipe

        return load_recipe(self.options.recipe or self.options.precision)

    @property
    def calibration(self):
        from .quant.quantize import CalibrationOptions

        o = self.options
        return CalibrationOptions(data=o.calib_data, samples=o.calib_samples, seq_len=o.calib_seq_len)

    def stage_hash(self, name: str) -> str | None:
        """The input hash a stage of this run was recorded with (None: not run)."""
        return self.record.get("stages", {}).get(name, {}).get("hash")


# ---- the stages ------------------------------------------------------------------------------------------
def _read_stage() -> Stage:
    from .export.inspect import read_summary

    return Stage("read", None, lambda b: {"checkpoint": b.checkpoint.fingerprint()},
                 lambda b, tmp: read_summary(b.checkpoint))


def _quantize_stage() -> Stage:
    from .quant.quantize import check_quantize_options, implied_precision, quantize_checkpoint, quantize_inputs

    def check(b: Build) -> str | None:
        """The recipe fits the model and agrees with --precision (a --recipe alone sets the precision it
        implies, and says so); the calibration options; the quantized tensors split over --tp."""
        o, spec = b.options, b.checkpoint.spec
        implied = implied_precision(b.recipe, spec)
        note = None
        if o.precision is None:
            o.precision, note = implied, f"--recipe {o.recipe} implies --precision {implied}"
        elif o.recipe is not None and o.precision != implied:
            raise BuildError(f"--precision {o.precision} conflicts with --recipe {o.recipe}, which builds "
                             f"{implied}: drop --precision (the recipe implies it) or pass --precision {implied}")
        check_quantize_options(spec, b.recipe, b.calibration, o.tp, o.moe_parallel)
        return note

    return Stage("quantize", "checkpoint",
                 lambda b: quantize_inputs(b.checkpoint, b.options.precision, b.recipe, b.calibration),
                 lambda b, tmp: quantize_checkpoint(b.checkpoint, b.recipe, b.calibration, tmp), check)


def _shard_source(b: Build) -> Path:
    """OUT/checkpoint when the build wrote one, else the input checkpoint."""
    from .export.checkpoint import CONFIG_FILE

    built = b.folder.checkpoint
    return built if (built / CONFIG_FILE).is_file() else b.checkpoint_path


def _shard_stage() -> Stage:
    from .export.checkpoint import open_checkpoint
    from .export.rank_writer import RANK_FORMAT, write_ranks

    def inputs(b: Build) -> dict:
        source = _shard_source(b)
        return {"source": str(source.resolve()), "fingerprint": open_checkpoint(source).fingerprint(),
                "tp": b.options.tp, "moe_parallel": b.options.moe_parallel, "format": RANK_FORMAT}

    from .export.sharding import check_tp

    return Stage("shard", "ranks", inputs,
                 lambda b, tmp: write_ranks(_shard_source(b), tmp, b.options.tp, b.options.moe_parallel),
                 lambda b: check_tp(b.checkpoint.spec, b.options.tp, b.options.moe_parallel))


def _engines_stage() -> Stage:
    import torch

    from .engines.executors.aot_build import EngineTarget, build_engines
    from .engines.executors.aot_manifest import FORMAT, host_arch
    from .engines.runtime.factory import DEFAULT_MTP_DRAFT_TOKENS
    from .export.checkpoint import open_checkpoint

    def target(b: Build) -> EngineTarget:
        o = b.options
        k = DEFAULT_MTP_DRAFT_TOKENS if o.engine_mtp is None else o.engine_mtp
        target = EngineTarget(o.engine_device, o.engine_max_sequences, o.engine_max_length, k, o.engine_sampling)
        return target if o.engine_prefill_tokens is None else dataclasses.replace(
            target, prefill_tokens=tuple(o.engine_prefill_tokens))

    def skipped(b: Build) -> str | None:
        if not b.options.engines:
            return "not asked for (nemo3-build --engines)"
        if b.options.target != "torch":
            return f"--target {b.options.target}: its repository serves with another runtime"
        return None

    def inputs(b: Build) -> dict:
        why = skipped(b)
        return {"skipped": why} if why else {
            "source": open_checkpoint(_shard_source(b)).fingerprint(), "target": dataclasses.asdict(target(b)),
            "tp": b.options.tp, "arch": host_arch(b.options.engine_device), "torch": torch.__version__,
            "format": FORMAT}

    return Stage("engines", "engines", inputs,
                 lambda b, tmp: build_engines(_shard_source(b), tmp, target(b), b.options.tp, skipped(b), log=print))


def _tensorrt_stage() -> Stage:
    """OUT/engines/tensorrt/ (--target tensorrt): the step graphs as ONNX; the engines are built where TensorRT is."""
    from .engines.executors.compiled_step import PREFILL_TOKENS
    from .engines.executors.tensorrt_build import build_plans, tensorrt_installed
    from .engines.executors.tensorrt_folder import FORMAT, TensorRTTarget, build_command, write_tensorrt_folder
    from .engines.runtime.factory import DEFAULT_MTP_DRAFT_TOKENS
    from .export.checkpoint import open_checkpoint

    def target(b: Build) -> TensorRTTarget:
        o = b.options
        k = DEFAULT_MTP_DRAFT_TOKENS if o.engine_mtp is None else o.engine_mtp
        prefill = PREFILL_TOKENS if o.engine_prefill_tokens is None else tuple(o.engine_prefill_tokens)
        return TensorRTTarget(o.engine_max_sequences, o.engine_max_length, 1 + k, prefill, o.engine_sampling)

    def run(b: Build, tmp: Path | None) -> dict:
        from .engines.network.loading import load

        model = load(_shard_source(b))
        summary = write_tensorrt_folder(model, tmp, target(b))
        if tensorrt_installed():
            return {**summary, "plans": [str(p.relative_to(tmp)) for p in build_plans(tmp)]}
        return {**summary, "note": f"TensorRT is not installed here: the engines (rank0/*.plan) must be built where "
                                    f"it is, with `{build_command(b.folder.tensorrt.resolve())}`"}

    def check(b: Build) -> None:
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise BuildError(f"--target tensorrt: {' and '.join(missing)} not installed: install nemo3's onnx extra "
                             "(pip install -e '.[onnx]' in a checkout)")

    return Stage("tensorrt", "tensorrt",
                 lambda b: {"source": open_checkpoint(_shard_source(b)).fingerprint(),
                            "target": dataclasses.asdict(target(b)), "format": FORMAT},
                 run, check, applies=lambda options: options.target == "tensorrt")


def _triton_stage() -> Stage:
    from .triton_repo.build_repository import repository_inputs, repository_options, write_validated_repository

    def options(b: Build):
        o = b.options
        spec = b.checkpoint.spec if o.target == "trtllm" else None
        return repository_options(o.target, o.tp, o.moe_parallel, spec, b.folder.checkpoint)

    return Stage("triton_repo", "triton_repo", lambda b: repository_inputs(options(b), b.folder.triton_repo),
                 lambda b, tmp: write_validated_repository(options(b), tmp, b.folder.triton_repo))


def _report_stage() -> Stage:
    import dataclasses as dc

    from .engines.evaluation.compare import CompareOptions
    from .engines.evaluation.report import write_report

    compare_options = CompareOptions()

    def run(b: Build, tmp: Path | None) -> dict:
        built = b.folder.checkpoint
        if not built.is_dir():
            raise BuildError(f"{built}: no checkpoint to report on (the quantize stage writes it)")
        return write_report(built, b.checkpoint_path, b.recipe.name, tmp, compare_options)

    return Stage("report", "report",
                 lambda b: {"quantize": b.stage_hash("quantize"), "reference": b.checkpoint.fingerprint(),
                            "options": dc.asdict(compare_options)}, run)


STAGES = {"read": _read_stage, "quantize": _quantize_stage, "shard": _shard_stage, "engines": _engines_stage,
          "tensorrt": _tensorrt_stage,  # (after engines: it writes OUT/engines/tensorrt inside the engines folder)
          "triton_repo": _triton_stage, "report": _report_stage}  # in build order


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stages(options: BuildOptions, names: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the named stages (default: all, in build order), skipping those whose inputs are unchanged."""
    unknown = sorted(set(names or []) - set(STAGES))
    if unknown:
        raise BuildError(f"unknown stage(s) {', '.join(unknown)}: expected {', '.join(STAGES)}")
    b = Build(options)
    stages = [stage for stage in (STAGES[n]() for n in STAGES if names is None or n in names)
              if stage.applies is None or stage.applies(options)]
    for stage in stages:  # every option against the model, before anything is written or computed
        note = stage.check(b) if stage.check is not None else None
        if note:
            log(f"[{stage.name}] {note}")
    folder = b.folder
    prepare_output(folder.root)
    previous = folder.record()
    b.record = {
        "nemo3_version": __version__,
        "options": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in dataclasses.asdict(options).items() if k != "force"},
        "versions": _versions(),
        "stages": {},
    }
    for stage in stages:
        key = stable_hash(stage.inputs(b))
        old = previous.get("stages", {}).get(stage.name, {})
        final = getattr(folder, stage.folder) if stage.folder else None
        if not options.force and old.get("hash") == key and (final is None or final.exists()):
            log(f"[{stage.name}] up to date, skipped")
            b.record["stages"][stage.name] = old
            continue
        tmp = None
        if final is not None:
            tmp = folder.root / f"{TMP_PREFIX}{stage.folder}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        log(f"[{stage.name}] running")
        start = time.perf_counter()
        summary = stage.run(b, tmp) or {}
        if final is not None:
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        seconds = round(time.perf_counter() - start, 3)
        b.record["stages"][stage.name] = {"hash": key, "seconds": seconds, **summary}
        _write_record(folder, b.record)  # after each stage: an interrupted build keeps what completed
        log(f"[{stage.name}] done in {seconds:.1f}s")
        if "note" in summary:  # what the user must do next
            log(f"[{stage.name}] {summary['note']}")
    _write_record(folder, b.record)
    return b.record


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


def _write_record(folder: BuildFolder, record: dict) -> None:
    tmp = folder.record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, folder.record_path)


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "nvidia-modelopt", "triton", "tritonclient", "safetensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def build(options: BuildOptions, log: Callable[[str], None] = print) -> dict:
    return run_stages(options, log=log)
