"""The layout of a build folder (`nemo3-build --output OUT`), known here and nowhere else.

    OUT/build.json   what was built from what (options, inputs' hashes, versions, stage timings)
    OUT/checkpoint/  the quantized (or BF16) unified HF checkpoint
    OUT/ranks/       rank{r}/ weights + config.json per tensor-parallel rank
    OUT/triton_repo/ the Triton model repository
    OUT/report/      accuracy against the BF16 reference

Commands that take "a build or a checkpoint" resolve it with `model_folder` and name it with `label_of`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .builtin import resolve_checkpoint

RECORD = "build.json"


@dataclass(frozen=True)
class BuildFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, path: str | Path | None) -> "BuildFolder | None":
        """The build folder at `path`, or None when `path` is not one (a checkpoint, or None: the built-in model)."""
        return cls(Path(path)) if path is not None and (Path(path) / RECORD).is_file() else None

    # the folders a build writes; `stage_folders` names them for the pipeline
    @property
    def record_path(self) -> Path:
        return self.root / RECORD

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    @property
    def tensorrt(self) -> Path:
        return self.engines / "tensorrt"

    @property
    def triton_repo(self) -> Path:
        return self.root / "triton_repo"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def record(self) -> dict:
        """build.json's content; {} when there is none or it is corrupt (a rebuild redoes every stage)."""
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @property
    def options(self) -> dict:
        return self.record().get("options", {})

    @property
    def label(self) -> str:
        """What the build is: its recipe, else its precision; "tp N" added for a tensor-parallel build."""
        options = self.options
        name = options.get("recipe") or options.get("precision") or "build"
        return f"{name} tp{options['tp']}" if options.get("tp", 1) > 1 else name


def model_folder(path: str | Path | None) -> Path:
    """The checkpoint to load for `path`: a build folder's checkpoint/, a checkpoint folder itself, or (None) the
    built-in model."""
    build = BuildFolder.of(path)
    return build.checkpoint if build is not None else resolve_checkpoint(path)


def label_of(path: str | Path | None) -> str:
    """A short name for a build or checkpoint: a build's recipe (or precision); for a checkpoint, the recipe nemo3
    recorded in its hf_quant_config.json, else ModelOpt's quant_algo, else "bf16"."""
    build = BuildFolder.of(path)
    if build is not None:
        return build.label
    quant = model_folder(path) / "hf_quant_config.json"
    if not quant.is_file():
        return "bf16"
    config = json.loads(quant.read_text())
    recipe = (config.get("nemo3") or {}).get("recipe") or {}
    return recipe.get("name") or str(config.get("quantization", {}).get("quant_algo") or "quantized").lower()


class BuildError(RuntimeError):
    """A build that cannot go on; the message says which input or option is at fault."""
