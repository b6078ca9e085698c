"""NVIDIA's Nemotron 3 recipes as ModelOpt ships them, read with ModelOpt's own loader.

nvidia-modelopt 0.47 installs `modelopt_recipes/models/nvidia/<model>/ptq/<recipe>.yaml`: the PTQ
recipes NVIDIA publishes its Nemotron 3 checkpoints with (Super `nvfp4-mse`, which mirrors the
published Super NVFP4 checkpoint, and `nvfp4-max-calib`; Ultra `nvfp4-4o6`; Nano 4B `nvfp4_w4a16`;
Nemotron 3.5 Lightning `w4a16_nvfp4_4o6`). A recipe is named as ModelOpt's library names it, without
the `models/` folder and the suffix (`nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16/ptq/nvfp4-mse`),
or given as a path to a YAML file in ModelOpt's form (`metadata` + `quantize`).

`read(name_or_path)` resolves `$import`s and validates through `modelopt.recipe.load_recipe`, so the
quantize config handed to `mtq.quantize` is exactly ModelOpt's, calibration algorithm included
(`max`, `mse`, the FP8 scale sweep, four-over-six multipliers). `quantizer_attributes` replays the
config's ordered entries on one quantizer name the way ModelOpt's `set_quantizer_by_cfg` does (fnmatch
on the name and on its fused-experts form, later entries override, an entry with `cfg` replaces the
attributes); quant/recipes.py turns that into nemo3's per-layer formats.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

LIBRARY_FOLDER = "models"  # inside the modelopt_recipes package
NVIDIA_GLOB = "nvidia/*Nemotron-3*/ptq/*.yaml"
_FUSED_EXPERT = re.compile(r"((?:weight|input)_quantizers?)\.\d+$")  # ModelOpt's fused-experts list entries


class ModelOptRecipeError(ValueError):
    """A ModelOpt recipe that cannot be read; the message names the recipe."""


@dataclass(frozen=True)
class ModelOptRecipe:
    name: str  # library name, or the file's path
    description: str
    quantize: dict  # ModelOpt's QuantizeConfig, dumped: quant_cfg (normalized entries) and algorithm


def library_root() -> Path | None:
    """The installed `modelopt_recipes` package folder, found without importing ModelOpt (None: not installed)."""
    spec = importlib.util.find_spec("modelopt_recipes")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def shipped() -> dict[str, Path]:
    """NVIDIA's Nemotron 3 PTQ recipes that the installed ModelOpt ships: library name -> file."""
    root = library_root()
    if root is None:
        return {}
    models = root / LIBRARY_FOLDER
    return {str(path.relative_to(models).with_suffix("")): path for path in sorted(models.glob(NVIDIA_GLOB))}


def summary(path: Path) -> str:
    """`<calibration>: <first sentence of metadata.description>` of a recipe file (for listings; no ModelOpt
    import)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
        text = " ".join(str(data.get("metadata", {}).get("description", "")).split())
        algorithm = data.get("quantize", {}).get("algorithm", "max")
    except (OSError, yaml.YAMLError, AttributeError):
        return "(unreadable)"
    if isinstance(algorithm, dict):
        extra = ("FP8 scale sweep" if algorithm.get("fp8_scale_sweep")
                 else "four over six" if algorithm.get("stop_multiplier") == 1.5 else "")
        algorithm = algorithm.get("method", "max") + (f", {extra}" if extra else "")
    return f"{algorithm} calibration: {text.split('. ')[0].rstrip('.')}"


def is_modelopt_file(path: Path) -> bool:
    """Whether a YAML file is in ModelOpt's recipe form (`metadata` and `quantize` sections)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "metadata" in data and "quantize" in data


@functools.lru_cache(maxsize=None)
def read(name_or_path: str) -> ModelOptRecipe:
    """A shipped recipe by library name, or a ModelOpt-form YAML file, loaded by ModelOpt."""
    library = shipped()
    if name_or_path in library:
        target, name = library[name_or_path], name_or_path
    else:
        target, name = Path(name_or_path), str(name_or_path)
        if not target.is_file():
            raise ModelOptRecipeError(f"{name}: no such ModelOpt recipe (shipped: {', '.join(library) or 'none'})")
    try:
        from modelopt.recipe import load_recipe
        from modelopt.recipe.config import ModelOptPTQRecipe
    except ImportError as e:
        raise ModelOptRecipeError(f"recipe {name}: ModelOpt's recipes need nvidia-modelopt==0.47.0 "
                                  f"(pip install 'nemo3[quant]'): {e}") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints "[load_recipe] loading: ..."
            recipe = load_recipe(target)
    except Exception as e:  # ModelOpt raises ValueError, pydantic's ValidationError, YAML errors
        raise ModelOptRecipeError(f"{name}: ModelOpt cannot load it: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, ModelOptPTQRecipe):
        raise ModelOptRecipeError(f"{name}: a {type(recipe).__name__}, not a post-training quantization recipe")
    return ModelOptRecipe(name, " ".join(recipe.metadata.description.split()), recipe.quantize.model_dump())


def quantizer_attributes(quant_cfg: list[dict], name: str, parent_class: str | None) -> dict | None:
    """The attributes `quant_cfg` gives the quantizer `name` (ModelOpt's module name) whose parent module is a
    `parent_class` (ModelOpt's registry key, e.g. `nn.Linear`; None for a fused-experts list); None: disabled.
    Quantizers start disabled (every shipped recipe begins with `*` off)."""
    fused = _FUSED_EXPERT.sub(lambda m: m[1].removesuffix("s"), name)
    state: dict | None = None
    for entry in quant_cfg:
        if not (fnmatch.fnmatch(name, entry["quantizer_name"]) or fnmatch.fnmatch(fused, entry["quantizer_name"])):
            continue
        if entry.get("parent_class") and entry["parent_class"] != parent_class:
            continue
        cfg = entry.get("cfg")
        if isinstance(cfg, list):
            raise ModelOptRecipeError(f"{name}: sequential quantizers (a list of cfg) are not a nemo3 format")
        if cfg is not None:
            state = {**cfg, "enable": entry.get("enable", True)}
        elif state is not None:
            state = {**state, "enable": entry["enable"]}
        else:
            state = {"enable": entry["enable"]}
    return state if state and state.get("enable") else None
