"""The build's checkpoint: ModelOpt's unified HF export, corrected so that other loaders take it.

`export_quantized(model, source, out)` runs `modelopt.torch.export.export_hf_checkpoint` on a model
calibrated by quant/calibrate.py (unquantized tensors in BF16), then repairs what ModelOpt 0.47
gets wrong for nemotron_h:

* module names in `exclude_modules` / `quantized_layers` (hf_quant_config.json) and in config.json's
  `quantization_config` (`ignore`, `targets`, `quantized_layers`) come out as
  `backbone.layers.0.mixer.conv1d.\\x00backbone.pt_name_sentinel`: the sentinel ModelOpt appends
  before renaming `model.` to `backbone.` is renamed too and never stripped. The suffix is removed;
  MTP models get `mtp*` in `exclude_modules` (the MTP layers stay BF16);
* `quantized_layers` lists a layer's fused routed experts once, as `backbone.layers.N.mixer.experts`;
  NVIDIA's published NVFP4 checkpoints list every expert and projection
  (`backbone.layers.N.mixer.experts.E.up_proj` / `.down_proj`), and TensorRT-LLM's Nemotron-H MoE
  looks the experts' format up by that per-expert prefix (a layer-level key falls through to the
  global MIXED_PRECISION config: BF16 buffers, then a shape mismatch). The key is expanded so;
* the embedding is written as `backbone.embedding.weight`; hub checkpoints, and vLLM's nemotron_h
  loader (which maps the substring `embeddings` to `embed_tokens` and has no parameter named
  `embedding`), need `backbone.embeddings.weight`, so it is renamed;
* transformers has no MTP modules, so the `mtp.*` weights are missing: they are read from the
  source checkpoint (export/checkpoint.py) and written in BF16 to `model-mtp.safetensors`;
* config.json is transformers' (`layers_block_type`, `dtype`): it is replaced by the hub-style
  config (`hybrid_override_pattern`, `mtp_hybrid_override_pattern`, `num_nextn_predict_layers`;
  ModelSpec.to_config) with `torch_dtype: bfloat16` and the cleaned `quantization_config`.

Then `model.safetensors.index.json` is written for every shard, and the tokenizer files are
copied. hf_quant_config.json also gets a `nemo3` entry (recipe and calibration data hash), so
that a checkpoint calibrated differently has a different `Checkpoint.fingerprint`.

`export_unquantized(source, out)` writes the same layout without quantization: every tensor in
BF16 (router correction biases fp32) under its canonical (hub) name, in shards of `max_shard_bytes`.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from ..export.checkpoint import CONFIG_FILE, DTYPES, INDEX_FILE, QUANT_CONFIG_FILE, Checkpoint, read_header
from ..export.names import EMBEDDING, fp32_tensors
from ..export.safetensors_writer import SafetensorsWriter, tensor_bytes
from ..export.spec import ModelSpec
from .modelopt_cpu import cpu_static_nvfp4

DTYPE = torch.bfloat16
MTP_FILE = "model-mtp.safetensors"
MODELOPT_EMBEDDING = "backbone.embedding.weight"
MTP_EXCLUDE = "mtp*"
EXPERT_PROJECTIONS = ("up_proj", "down_proj")
MAX_SHARD_BYTES = 5 * 2**30
# ModelOpt 0.47's leftover: `.` + NUL + whatever its own renaming made of "modelopt_name_sentinel"
_SENTINEL = re.compile(r"\.?\x00[^*\x00]*?name_sentinel")


class ExportError(RuntimeError):
    """An export that came out in a form nemo3 cannot repair; the message names the file and entry."""


# ---- config files ------------------------------------------------------------------------------------
def clean_module_name(name: str, source: str = QUANT_CONFIG_FILE) -> str:
    """`backbone.layers.0.mixer.conv1d.\\x00backbone.pt_name_sentinel` -> `backbone.layers.0.mixer.conv1d`
    (a trailing wildcard stays)."""
    cleaned = _SENTINEL.sub("", name)
    if "\x00" in cleaned:
        raise ExportError(f"{source}: module name {name!r} has a NUL character nemo3 does not know how to remove")
    return cleaned


def clean_quantization(quantization: dict, spec: ModelSpec) -> dict:
    """hf_quant_config.json's `quantization` with clean module names, routed experts listed per expert and
    projection, and `mtp*` excluded for MTP models."""
    out = dict(quantization)
    has_mtp = bool(spec.num_nextn_predict_layers)
    if "exclude_modules" in out or has_mtp:
        excluded = [clean_module_name(n) for n in out.get("exclude_modules") or []]
        if has_mtp and MTP_EXCLUDE not in excluded:
            excluded.append(MTP_EXCLUDE)
        out["exclude_modules"] = excluded
    if isinstance(out.get("quantized_layers"), dict):
        layers = {}
        for key, value in out["quantized_layers"].items():
            for name in per_expert(clean_module_name(key), spec.n_routed_experts):
                layers[name] = value
        out["quantized_layers"] = layers
    return out


def per_expert(module: str, n_experts: int) -> list[str]:
    """`backbone.layers.N.mixer.experts` -> `...experts.{e}.up_proj`, `...experts.{e}.down_proj` for every
    expert (how NVIDIA's checkpoints list them); any other module name stays as it is."""
    if not module.endswith(".mixer.experts"):
        return [module]
    return [f"{module}.{e}.{proj}" for e in range(n_experts) for proj in EXPERT_PROJECTIONS]


def hub_config(spec: ModelSpec, quantization_config: dict | None = None) -> dict:
    """config.json of an exported checkpoint: hub keys, BF16, and the quantization config if any."""
    config = spec.to_config()
    config.pop("dtype", None)  # transformers >= 5 spelling; hub configs say torch_dtype
    config.pop("quantization_config", None)
    config["torch_dtype"] = "bfloat16"
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---- safetensors -------------------------------------------------------------------------------------
def export_dtype(name: str) -> torch.dtype:
    """BF16, except the tensors every loader keeps in fp32 (router correction biases)."""
    return torch.float32 if fp32_tensors(name) else DTYPE


def write_tensors(path: Path, source: Checkpoint, names: list[str]) -> None:
    """Canonical tensors `names` of `source`, converted to their export dtype, into one safetensors file."""
    entries = [(name, export_dtype(name), source.shape(name)) for name in names]
    with SafetensorsWriter(path, entries, metadata={"format": "pt"}) as out:
        for name, dtype, _ in entries:
            out.write(name, source.get(name, dtype=dtype))


def rename_tensors(path: Path, renames: dict[str, str]) -> None:
    """Rewrite one safetensors file with some tensors renamed, one tensor in memory at a time."""
    from safetensors import safe_open

    header = read_header(path)
    entries = [(renames.get(key, key), _dtype(path, t), t.stored_shape) for key, t in header.items()]
    with safe_open(path, framework="pt") as f:
        with SafetensorsWriter(path, entries, metadata=f.metadata()) as out:
            for key in header:
                out.write(renames.get(key, key), f.get_tensor(key))


def _dtype(path: Path, stored) -> torch.dtype:
    if stored.dtype not in DTYPES:
        raise ExportError(f"{path}: tensor {stored.key} has dtype {stored.dtype}, which nemo3 does not read")
    return DTYPES[stored.dtype]


def write_index(folder: Path) -> dict[str, str]:
    """model.safetensors.index.json over every `*.safetensors` in `folder`; returns its weight_map."""
    weight_map, total = {}, 0
    for file in sorted(folder.glob("*.safetensors")):
        for key, stored in read_header(file).items():
            if key in weight_map:
                raise ExportError(f"{file}: tensor {key} is also in {weight_map[key]}")
            weight_map[key] = file.name
            total += tensor_bytes(_dtype(file, stored), stored.stored_shape)
    weight_map = dict(sorted(weight_map.items()))
    _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map


def copy_tokenizer(source: Checkpoint, out: Path) -> list[str]:
    names = []
    for file in source.tokenizer_files():
        shutil.copyfile(file, out / file.name)
        names.append(file.name)
    return names


def shard_names(source: Checkpoint, names: Iterable[str], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensors of at most `max_bytes` (in their export dtype) each."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensor_bytes(export_dtype(name), source.shape(name))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


# ---- the two exports ---------------------------------------------------------------------------------
def export_quantized(model, source: Checkpoint, out: str | Path, provenance: dict | None = None) -> dict:
    """Export a ModelOpt-calibrated NemotronHForCausalLM into `out` (see the module docstring).

    `source` is the checkpoint the model was loaded from (its spec, MTP tensors and tokenizer).
    Returns a summary: files, tensors, bytes, quant_algo, kv_cache_quant_algo.
    """
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    out = Path(out)
    spec = source.spec
    model.config.architectures = ["NemotronHForCausalLM"]
    with cpu_static_nvfp4():  # ModelOpt's export runs its static NVFP4 fake quant (MSE-calibrated weights)
        export_hf_checkpoint(model, dtype=DTYPE, export_dir=out)
    quant_path = out / QUANT_CONFIG_FILE
    if not quant_path.is_file():
        raise ExportError(f"{out}: ModelOpt wrote no {QUANT_CONFIG_FILE}; the recipe quantized nothing "
                          "(use export_unquantized for BF16)")
    modelopt_config = json.loads(quant_path.read_text())
    quantization = clean_quantization(modelopt_config.get("quantization", {}), spec)
    hf_quant = {"producer": modelopt_config.get("producer"), "quantization": quantization}
    config = hub_config(spec, convert_hf_quant_config_format(copy.deepcopy(hf_quant)))
    _write_json(quant_path, {**hf_quant, "nemo3": provenance or {}})
    _write_json(out / CONFIG_FILE, config)

    for file in sorted(out.glob("*.safetensors")):
        file.chmod(0o644)  # ModelOpt 0.47 leaves its shards 0600, unlike every other file of a build
        if MODELOPT_EMBEDDING in read_header(file):
            rename_tensors(file, {MODELOPT_EMBEDDING: EMBEDDING})
    mtp = [name for name in source.names() if name.startswith("mtp.")]
    if mtp:
        write_tensors(out / MTP_FILE, source, mtp)
    return _finish(source, out, quantization)


def export_unquantized(source: Checkpoint, out: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write `source` as a BF16 hub-style checkpoint into `out` (canonical names, MTP included)."""
    out = Path(out)
    shards = shard_names(source, source.names(), max_shard_bytes)
    for i, names in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(out / file, source, names)
    _write_json(out / CONFIG_FILE, hub_config(source.spec))
    generation = source.path / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out / generation.name)
    return _finish(source, out, {})


def _finish(source: Checkpoint, out: Path, quantization: dict) -> dict:
    """Write the index, copy the tokenizer; the export's summary."""
    weight_map = write_index(out)
    tokenizer = copy_tokenizer(source, out)
    return {"files": sorted(set(weight_map.values())), "tensors": len(weight_map),
            "mtp_tensors": sum(n.startswith("mtp.") for n in weight_map),
            "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")), "tokenizer_files": tokenizer,
            "quant_algo": quantization.get("quant_algo"),
            "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo")}
