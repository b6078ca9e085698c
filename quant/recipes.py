"""Recipes: which layer of a Nemotron 3 model gets which precision, and ModelOpt's config for it.

A recipe is a table of (canonical layer pattern -> format) rules plus the KV-cache format and the
SSM-state dtype; quant/recipe_tables.py has the built-in ones and explains the form, which user
recipe files (YAML or JSON) share:

    name: my-recipe
    kv_cache: fp8
    ssm_state: float32
    layers:
      - {pattern: "backbone.layers.*.mixer.experts.*", format: nvfp4}
      - {pattern: "backbone.layers.*.mixer.fc?_latent_proj", format: bf16, optional: true}
      - {pattern: "backbone.layers.*", format: fp8}

`Recipe.to_modelopt_quant_cfg(spec)` translates a recipe into ModelOpt 0.47's quantize config for
transformers' NemotronHForCausalLM (module names `model.layers.{i}.mixer...`; transformers 5.14).
There, ModelOpt wraps each fused `NemotronHExperts` in `_QuantNonGatedFusedExperts`, whose
quantizers are `experts.up_proj_weight_quantizers.{e}` (one per expert) and a single
`experts.up_proj_input_quantizer` shared by all experts of the layer (same for `down_proj`);
ModelOpt matches config patterns against those names with the expert index dropped
(`experts.up_proj_weight_quantizer`). The router (NemotronHTopkRouter) gets no quantizer.

NVIDIA's own recipes come as ModelOpt ships them (quant/modelopt_recipes.py): `load_recipe` takes a
shipped recipe's library name (`nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16/ptq/nvfp4-mse`), a
ModelOpt-form YAML file, or one of the short ALIASES. Such a recipe keeps ModelOpt's quantize config
(calibration algorithm included) and hands it to `mtq.quantize` unchanged; the format of each layer
is what that config gives the layer's quantizers (weight and input: NVFP4 + NVFP4 is `nvfp4`, NVFP4
alone `nvfp4_w4a16`, FP8 + FP8 `fp8`), and a config that quantizes what nemo3 cannot run (the
embedding, conv1d, FP8 weights without FP8 activations) is refused in one line naming it.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

from ..export.names import LM_HEAD, expected_tensors
from ..export.spec import ModelSpec
from .modelopt_recipes import (ModelOptRecipe, ModelOptRecipeError, is_modelopt_file, quantizer_attributes, read, shipped,
                               summary)
from .recipe_tables import ALIASES, BUILTIN

NVFP4, NVFP4_W4A16, FP8, BF16 = "nvfp4", "nvfp4_w4a16", "fp8", "bf16"
NVFP4_BLOCK = 16

# ModelOpt quantizer attributes (identical to the weight/input entries of its NVFP4_DEFAULT_CFG and
# FP8_DEFAULT_CFG / FP8_KV_CFG presets)
_NVFP4_QUANTIZER = {"num_bits": (2, 1), "effective_bits": 4.5,
                    "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)}}
_FP8_QUANTIZER = {"num_bits": (4, 3), "axis": None}


@dataclass(frozen=True)
class Format:
    name: str
    weight: dict | None  # ModelOpt attributes of the weight quantizer; None: disabled
    input: dict | None  # ... of the input (activation) quantizer
    quant_algo: str | None  # ModelOpt's `quant_algo` in hf_quant_config.json
    description: str


FORMATS = {f.name: f for f in (
    Format(NVFP4, _NVFP4_QUANTIZER, _NVFP4_QUANTIZER, "NVFP4", "NVFP4 weights and activations (W4A4, Blackwell)"),
    Format(NVFP4_W4A16, _NVFP4_QUANTIZER, None, "W4A16_NVFP4", "NVFP4 weights, BF16 activations"),
    Format(FP8, _FP8_QUANTIZER, _FP8_QUANTIZER, "FP8", "FP8 E4M3 per-tensor weights and activations (W8A8)"),
    Format(BF16, None, None, None, "unquantized (the checkpoint's dtype)"),
)}
KV_CACHE_FORMATS = {FP8: _FP8_QUANTIZER, BF16: None}
SSM_STATE_DTYPES = ("float32", "bfloat16", "float16")

# Linear layers a recipe can quantize, by their last name component (plus lm_head).
LINEAR_LAYERS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                 "fc1_latent_proj", "fc2_latent_proj", "eh_proj")
HF_PREFIX = "model."  # transformers 5.14 names the backbone `model`; the canonical names say `backbone`


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe (or file), rule and tensor at fault."""


def layer_of(tensor_name: str) -> str | None:
    """`backbone.layers.0.mixer.in_proj.weight` -> `backbone.layers.0.mixer.in_proj`; None for a tensor no
    recipe quantizes (biases, norms, router, conv1d, embeddings, ...)."""
    if tensor_name == LM_HEAD:
        return "lm_head"
    layer, _, leaf = tensor_name.rpartition(".")
    return layer if leaf == "weight" and layer.rpartition(".")[2] in LINEAR_LAYERS else None


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch pattern over canonical layer names
    format: str
    optional: bool = False  # no error when it matches no layer of the model


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[Rule, ...] = ()  # first match wins; unmatched layers are bf16
    kv_cache: str = BF16
    ssm_state: str = "float32"
    description: str = ""
    modelopt: ModelOptRecipe | None = None  # NVIDIA's recipe as ModelOpt ships it; then `layers` is empty

    @classmethod
    def from_modelopt(cls, recipe: ModelOptRecipe, name: str | None = None) -> "Recipe":
        """nemo3's view of a ModelOpt recipe; KV cache from its `[kv]_bmm_quantizer` entries."""
        kv = quantizer_attributes(recipe.quantize["quant_cfg"], HF_PREFIX + "layers.0.mixer.k_bmm_quantizer", None)
        kv_cache = BF16 if kv is None else _numeric(kv, f"recipe {recipe.name}: the K/V cache quantizer")
        return cls(name=name or recipe.name, kv_cache=kv_cache, description=recipe.description, modelopt=recipe)

    def __post_init__(self):
        for rule in self.layers:
            if not isinstance(rule.pattern, str) or not rule.pattern:
                raise RecipeError(f"recipe {self.name!r}: pattern {rule.pattern!r} must be a non-empty string")
            if rule.format not in FORMATS:
                raise RecipeError(f"recipe {self.name!r}: pattern {rule.pattern!r} has unknown format "
                                  f"{rule.format!r} (expected one of {', '.join(FORMATS)})")
        if self.kv_cache not in KV_CACHE_FORMATS:
            raise RecipeError(f"recipe {self.name!r}: kv_cache={self.kv_cache!r}: expected one of "
                              f"{', '.join(KV_CACHE_FORMATS)}")
        if self.ssm_state not in SSM_STATE_DTYPES:
            raise RecipeError(f"recipe {self.name!r}: ssm_state={self.ssm_state!r}: expected one of "
                              f"{', '.join(SSM_STATE_DTYPES)}")

    # ---- which format ----------------------------------------------------------------------------
    def rule_for(self, layer: str) -> Rule | None:
        return next((r for r in self.layers if fnmatchcase(layer, r.pattern)), None)

    def format_of(self, name: str) -> str:
        """Format of a canonical layer (`backbone.layers.3.mixer.in_proj`) or tensor (`....in_proj.weight`)."""
        layer = name if name == "lm_head" or name.rpartition(".")[2] in LINEAR_LAYERS else layer_of(name)
        if layer and self.modelopt is not None:
            return self._modelopt_format(layer)
        rule = self.rule_for(layer) if layer else None
        return rule.format if rule else BF16

    def _modelopt_format(self, layer: str) -> str:
        """What the ModelOpt recipe's weight and input quantizers of `layer` make of it (MTP: BF16, as
        transformers has no MTP modules for ModelOpt to quantize)."""
        if layer.startswith("mtp."):
            return BF16
        weight, act = (quantizer_attributes(self.modelopt.quantize["quant_cfg"], name, "nn.Linear")
                       for name in _modelopt_quantizers(layer))
        where = f"recipe {self.name}: {layer}"
        if weight is None:
            if act is not None:
                raise RecipeError(f"{where}: input quantizer on without a weight quantizer (not a nemo3 format)")
            return BF16
        kind = _numeric(weight, f"{where} weight")
        if act is None:
            if kind == FP8:
                raise RecipeError(f"{where}: FP8 weights with BF16 activations (W8A16) are not a nemo3 format")
            return NVFP4_W4A16
        if _numeric(act, f"{where} input") != kind:
            raise RecipeError(f"{where}: {kind} weights with {_numeric(act, where)} activations are not a nemo3 format")
        return kind

    def _check_modelopt_unquantized(self, spec: ModelSpec) -> None:
        """The embedding and the Mamba conv1d stay BF16 in nemo3 (ModelOpt could quantize them)."""
        cfg = self.modelopt.quantize["quant_cfg"]
        sites = [("the embedding", HF_PREFIX + "embeddings.", "nn.Embedding")]
        sites += [(f"backbone.layers.{i}.mixer.conv1d", f"{HF_PREFIX}layers.{i}.mixer.conv1d.", "nn.Conv1d")
                  for i in spec.layers_of("M")]
        for what, prefix, parent in sites:
            for kind in ("weight", "input"):
                if quantizer_attributes(cfg, f"{prefix}{kind}_quantizer", parent) is not None:
                    raise RecipeError(f"recipe {self.name}: quantizes {what} ({kind}_quantizer), which nemo3 keeps "
                                      "BF16: its runtime has no quantized embedding or conv1d")

    def assign(self, spec: ModelSpec) -> dict[str, str]:
        """Every tensor of `spec` (expected_tensors) -> its format; bf16 for tensors that are never quantized."""
        tensors = expected_tensors(spec)
        layers = [layer for layer in map(layer_of, tensors) if layer]
        if self.modelopt is not None:
            self._check_modelopt_unquantized(spec)
        for rule in self.layers:
            if not rule.optional and not any(fnmatchcase(layer, rule.pattern) for layer in layers):
                raise RecipeError(
                    f"recipe {self.name!r}: pattern {rule.pattern!r} matches no quantizable layer of this model "
                    f"(linear layers such as {layers[0]!r}; the router, conv1d, norms and embeddings are "
                    "never quantized)")
        out = {}
        for name, shape in tensors.items():
            fmt = self.format_of(name)
            if fmt in (NVFP4, NVFP4_W4A16) and shape[-1] % NVFP4_BLOCK:
                why = (f"pattern {self.rule_for(layer_of(name)).pattern!r}" if self.modelopt is None
                       else f"ModelOpt recipe {self.modelopt.name}")
                raise RecipeError(
                    f"recipe {self.name!r}: {name} {list(shape)} cannot be {fmt} ({why}): its input dimension "
                    f"{shape[-1]} is not a multiple of the NVFP4 block size {NVFP4_BLOCK}")
            out[name] = fmt
        return out

    # ---- ModelOpt ----------------------------------------------------------------------------------
    def to_modelopt_quant_cfg(self, spec: ModelSpec) -> dict:
        """ModelOpt 0.47's quantize config (`mtq.quantize(model, cfg, forward_loop)`) for transformers'
        NemotronHForCausalLM built from `spec`: every quantizer off, then the recipe's weight and input
        quantizers (and the K/V quantizers of attention) on, with `max` calibration. A ModelOpt recipe's
        config is its own, unchanged (after checking that the model can run what it gives)."""
        if self.modelopt is not None:
            self.assign(spec)
            return copy.deepcopy(self.modelopt.quantize)
        sites: dict[str, dict[int | None, str]] = {}  # quantizer-name prefix with `{i}` -> layer index -> format
        for name, fmt in self.assign(spec).items():
            layer = layer_of(name)
            if layer is None or (layer.startswith("mtp.") and fmt == BF16):
                continue
            if layer.startswith("mtp."):
                raise RecipeError(f"recipe {self.name!r}: {name} cannot be {fmt}: transformers has no MTP modules, "
                                  "so ModelOpt cannot calibrate them (keep mtp.* bf16)")
            site, i = _modelopt_site(layer)
            by_layer = sites.setdefault(site, {})
            if by_layer.setdefault(i, fmt) != fmt:
                raise RecipeError(
                    f"recipe {self.name!r}: the routed experts of backbone.layers.{i} get different formats "
                    f"({by_layer[i]}, {fmt}) for {layer.rpartition('.')[2]}; ModelOpt quantizes a layer's fused "
                    "experts with one shared input quantizer, so they need one format")
        quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
        for site, by_layer in sites.items():
            uniform = len(set(by_layer.values())) == 1
            for i, fmt in ({"*": next(iter(by_layer.values()))} if uniform else by_layer).items():
                prefix = site.replace("{i}", str(i))
                for kind, cfg in (("weight", FORMATS[fmt].weight), ("input", FORMATS[fmt].input)):
                    if cfg is not None:
                        quant_cfg.append({"quantizer_name": f"{prefix}{kind}_quantizer", "cfg": dict(cfg)})
        kv = KV_CACHE_FORMATS[self.kv_cache]
        if kv is not None:
            quant_cfg.append({"quantizer_name": HF_PREFIX + "layers.*.mixer.[kv]_bmm_quantizer", "cfg": dict(kv)})
        return {"quant_cfg": quant_cfg, "algorithm": "max"}

    # ---- files -------------------------------------------------------------------------------------
    def quantizes(self) -> bool:
        """Whether the recipe quantizes anything (layers or the KV cache)."""
        return self.modelopt is not None or self.kv_cache != BF16 or any(r.format != BF16 for r in self.layers)

    def to_dict(self) -> dict:
        """The recipe in the file form (for build.json and for writing a user recipe); a ModelOpt recipe as
        its name and ModelOpt's quantize config."""
        if self.modelopt is not None:
            return {"name": self.name, "description": self.description, "modelopt_recipe": self.modelopt.name,
                    "quantize": json.loads(json.dumps(self.modelopt.quantize))}  # JSON keys and lists
        rules = [{"pattern": r.pattern, "format": r.format, **({"optional": True} if r.optional else {})}
                 for r in self.layers]
        return {"name": self.name, "description": self.description, "kv_cache": self.kv_cache,
                "ssm_state": self.ssm_state, "layers": rules}

    @classmethod
    def from_dict(cls, data, source: str, default_name: str = "custom") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping with keys name, kv_cache, ssm_state, layers")
        known = ("name", "description", "kv_cache", "ssm_state", "layers")
        for key in data:
            if key not in known:
                raise RecipeError(f"{source}: unknown key {key!r} (expected {', '.join(known)})")
        entries = data.get("layers") or []
        if not isinstance(entries, list):
            raise RecipeError(f"{source}: layers must be a list of {{pattern, format[, optional]}} entries")
        rules = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) - {"pattern", "format", "optional"} \
                    or not {"pattern", "format"} <= set(entry):
                raise RecipeError(f"{source}: layers[{n}] = {entry!r}: expected {{pattern, format[, optional]}}")
            if not isinstance(entry.get("optional", False), bool):
                raise RecipeError(f"{source}: layers[{n}]: optional={entry['optional']!r} must be true or false")
            rules.append(Rule(entry["pattern"], entry["format"], entry.get("optional", False)))
        try:
            return cls(name=str(data.get("name") or default_name), layers=tuple(rules),
                       kv_cache=data.get("kv_cache", BF16), ssm_state=data.get("ssm_state", "float32"),
                       description=data.get("description", ""))
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from None


def _numeric(attrs: dict, where: str) -> str:
    """ModelOpt quantizer attributes -> `nvfp4` (E2M1, blocks of 16, E4M3 scales) or `fp8` (E4M3 per tensor)."""
    bits, blocks = attrs.get("num_bits"), attrs.get("block_sizes") or {}
    bits = tuple(bits) if isinstance(bits, (list, tuple)) else bits
    if bits == (2, 1) and blocks.get(-1) == NVFP4_BLOCK and tuple(blocks.get("scale_bits") or ()) == (4, 3):
        return NVFP4
    if bits == (4, 3) and not blocks and attrs.get("axis") is None:
        return FP8
    raise RecipeError(f"{where}: num_bits={attrs.get('num_bits')} block_sizes={blocks or None} "
                      f"axis={attrs.get('axis')} is neither NVFP4 nor per-tensor FP8")


def _modelopt_quantizers(layer: str) -> tuple[str, str]:
    """Canonical layer -> the names of its ModelOpt weight and input quantizers on transformers' model."""
    site, i = _modelopt_site(layer)
    prefix = site if i is None else site.replace("{i}", str(i))
    expert = re.fullmatch(r"backbone\.layers\.\d+\.mixer\.experts\.(\d+)\.\w+", layer)
    return (f"{prefix}weight_quantizers.{expert[1]}" if expert else f"{prefix}weight_quantizer",
            f"{prefix}input_quantizer")


def _modelopt_site(layer: str) -> tuple[str, int | None]:
    """Canonical layer -> (prefix of its ModelOpt quantizer names, with `{i}` for the layer index; the index).

    `backbone.layers.3.mixer.in_proj`          -> `model.layers.{i}.mixer.in_proj.`, 3 (`...weight_quantizer`,
                                                  `...input_quantizer`)
    `backbone.layers.1.mixer.experts.7.up_proj` -> `model.layers.{i}.mixer.experts.up_proj_`, 1
                                                  (`..._weight_quantizers.7`, which ModelOpt's patterns match
                                                  as `..._weight_quantizer`, and the shared `..._input_quantizer`)
    `lm_head`                                  -> `lm_head.`, None
    """
    if layer == "lm_head":
        return "lm_head.", None
    i, rest = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", layer).groups()
    expert = re.fullmatch(r"mixer\.experts\.\d+\.(\w+)", rest)
    return HF_PREFIX + "layers.{i}." + (f"mixer.experts.{expert[1]}_" if expert else f"{rest}."), int(i)


RECIPES = {d["name"]: Recipe.from_dict(d, source="quant/recipe_tables.py") for d in BUILTIN}


def load_recipe(name_or_file: str | Path) -> Recipe:
    """A recipe by name: nemo3's own (RECIPES), a short alias of NVIDIA's (ALIASES), a ModelOpt-shipped one by
    its library name (`nvidia/<model>/ptq/<recipe>`); or a file: nemo3's form (.yaml/.yml/.json) or ModelOpt's
    (YAML with `metadata` and `quantize`)."""
    name = str(name_or_file)
    if isinstance(name_or_file, str) and name_or_file in RECIPES:
        return RECIPES[name_or_file]
    if isinstance(name_or_file, str) and (name in ALIASES or name in shipped()):
        return _from_modelopt(ALIASES.get(name, name), name)
    path = Path(name_or_file)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise RecipeError(f"unknown recipe {name!r}: expected one of {', '.join([*RECIPES, *ALIASES])}, a ModelOpt "
                          "recipe (`nemo3 recipes` lists them) or a .yaml/.yml/.json recipe file")
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    if path.suffix.lower() != ".json" and is_modelopt_file(path):
        return _from_modelopt(str(path), path.stem)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: not valid {path.suffix[1:].upper()} ({str(e).splitlines()[0]})") from None
    return Recipe.from_dict(data, source=str(path), default_name=path.stem)


def _from_modelopt(library_name_or_path: str, name: str) -> Recipe:
    try:
        return Recipe.from_modelopt(read(library_name_or_path), name=name)
    except ModelOptRecipeError as e:
        raise RecipeError(str(e)) from None


def recipe_catalog() -> list[tuple[str, str, str]]:
    """(name, where it comes from, what it is) for every recipe `load_recipe` knows by name: nemo3's own
    tables, the aliases of NVIDIA's, and NVIDIA's Nemotron 3 recipes as the installed ModelOpt ships them
    (read as YAML only: ModelOpt is not imported)."""
    library = shipped()
    rows = [(r.name, "nemo3", r.description) for r in RECIPES.values()]
    rows += [(alias, f"alias of {target}", summary(library[target]) if target in library else "(ModelOpt not installed)")
             for alias, target in ALIASES.items()]
    rows += [(name, "ModelOpt", summary(path)) for name, path in library.items()]
    return rows
