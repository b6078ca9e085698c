"""Reading a Hugging Face Nemotron 3 checkpoint folder: memory-mapped, one tensor at a time, by canonical name.

    ckpt = open_checkpoint("NVIDIA-Nemotron-3-Super-120B-A12B")
    ckpt.validate()                                  # every tensor config.json implies, nothing else
    w = ckpt.get("backbone.layers.3.mixer.experts.7.up_proj.weight", dtype=torch.bfloat16)

The folder holds `config.json` and either one `model.safetensors` (any `*.safetensors` when there is
no index) or shards listed by `model.safetensors.index.json`. Opening reads only the safetensors
headers, and checks each against its file's size, so a truncated or corrupt file fails at open time
with the file named. Tensors are read from the memory-mapped files when asked for; nothing holds the
whole checkpoint in memory.

Every naming scheme is mapped onto the canonical names of `export.names` (the hub's):

    hub                    backbone.*, backbone.embedding(s).weight, mixer.experts.{e}.up_proj.weight
    transformers >= 5      model.* and fused 3-D experts mixer.experts.up_proj [E, I, D_e] and
                           mixer.experts.down_proj [E, D_e, I], served lazily as per-expert slices
    MTP                    mtp.layers.{j}.* (top level in hub checkpoints; backbone.mtp./model.mtp. accepted)
    vision-language        language_model.* / model.language_model.*; the other parts (vision tower,
                           projector) are skipped and the language model's config is read from
                           config.json's `text_config` or `llm_config`

Pickled checkpoints (`*.bin`, `*.pt`, `*.pth`) are refused, never loaded.

Quantized checkpoints: with an `hf_quant_config.json` in the folder, a tensor whose last name
component is one of QUANT_SUFFIXES next to a known `....weight` is accepted as that weight's
companion, and the weight itself (packed, so of another shape and dtype) is left to `quant/layout.py`
to check.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .names import EMBEDDING, expected_tensors
from .spec import ModelSpec

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
QUANT_CONFIG_FILE = "hf_quant_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Companions of a quantized `X.weight` in ModelOpt's unified export, named `X.<suffix>` (an attention
# layer's FP8 KV-cache scales ride on its k_proj / v_proj: `...k_proj.k_scale`, `...v_proj.v_scale`).
QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "chat_template*")

# safetensors dtype strings nemo3 reads (others are refused by validate()/get(), with the tensor named)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mixer\.experts)\.(?P<proj>up_proj|down_proj)$")
_LANGUAGE_PREFIXES = ("model.language_model.", "language_model.")


class CheckpointError(ValueError):
    """A checkpoint nemo3 cannot read or that does not match its config; the message names file and tensor."""


@dataclass(frozen=True)
class StoredTensor:
    """Where a canonical tensor lives: `key` in `file`; for fused experts, slice `expert` of its first dim."""

    file: Path
    key: str
    dtype: str  # safetensors dtype string ("BF16", "F32", ...)
    stored_shape: tuple[int, ...]
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored_shape[1:] if self.expert is not None else self.stored_shape

    def describe(self) -> str:
        """`<file>: <key>[e]`, for messages."""
        return f"{self.file}: {self.key}" + (f"[{self.expert}]" if self.expert is not None else "")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """CheckpointError naming `what` (file and tensor) if a floating tensor holds NaN or inf."""
    if not tensor.is_floating_point():
        return
    values = tensor.float() if tensor.element_size() == 1 else tensor  # float8: isfinite needs a wider type
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise CheckpointError(f"{what}: {bad} NaN/inf value(s) in {tuple(tensor.shape)}; the weights are corrupt")


def open_checkpoint(path: str | Path) -> "Checkpoint":
    """Open a checkpoint folder: parse config.json and the safetensors headers (no tensor data is read)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    spec = _read_spec(path)
    index = path / INDEX_FILE
    stored = _stored_from_index(index) if index.is_file() else _stored_from_files(path)
    return Checkpoint(path, spec, stored)


class Checkpoint:
    """A checkpoint opened by `open_checkpoint`: names, shapes and dtypes from the headers, data on demand."""

    def __init__(self, path: Path, spec: ModelSpec, stored: list[StoredTensor]):
        self.path = path
        self.spec = spec
        self.quantized = (path / QUANT_CONFIG_FILE).is_file()
        self._files = sorted({t.file for t in stored})
        multimodal = any(t.key.startswith(_LANGUAGE_PREFIXES) for t in stored)
        by_name: dict[str, StoredTensor] = {}
        self.skipped: list[str] = []  # stored keys outside the language model (vision-language checkpoints)
        for t in stored:
            if multimodal and not t.key.startswith(_LANGUAGE_PREFIXES) and t.key != "lm_head.weight":
                self.skipped.append(t.key)
                continue
            for name, tensor in _canonical(t):
                if name in by_name:
                    raise CheckpointError(f"{tensor.describe()}: holds canonical tensor {name}, "
                                          f"which {by_name[name].describe()} holds too")
                by_name[name] = tensor
        order = {name: i for i, name in enumerate(expected_tensors(spec))}

        def model_order(name: str):
            base = _companion_of(name) or name
            return (order.get(base, len(order)), name != base, name)

        self._tensors = {name: by_name[name] for name in sorted(by_name, key=model_order)}
        self._handles: dict[Path, object] = {}

    # ---- what is there ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Canonical names of every tensor present, in model order (unknown names last)."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored(name).shape

    def dtype(self, name: str) -> torch.dtype:
        t = self._stored(name)
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{t.describe()}: unsupported dtype {t.dtype}")
        return DTYPES[t.dtype]

    def source_name(self, name: str) -> str:
        """Where canonical `name` is stored: `<file>: <stored name>[expert]`, for messages."""
        return self._stored(name).describe()

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files in the folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...)."""
        found = {p for pattern in TOKENIZER_PATTERNS for p in self.path.glob(pattern) if p.is_file()}
        return sorted(found)

    # ---- data --------------------------------------------------------------------------------------
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from its memory-mapped file (a fused expert tensor: only expert e's slice)."""
        t = self._stored(name)
        self.dtype(name)  # refuses dtypes nemo3 does not read
        from safetensors import SafetensorError, safe_open

        try:
            if t.file not in self._handles:
                self._handles[t.file] = safe_open(t.file, framework="pt")
            handle = self._handles[t.file]
            tensor = handle.get_slice(t.key)[t.expert] if t.expert is not None else handle.get_tensor(t.key)
        except SafetensorError as e:
            raise CheckpointError(f"{t.describe()}: cannot read ({e})") from None
        check_finite(tensor, t.describe())  # every reader of the weights passes here: no second pass over them
        return tensor.to(dtype) if dtype is not None else tensor

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checks ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check names, shapes and dtypes (from the headers) against `expected_tensors(spec)`.

        Raises CheckpointError with the first problem, naming tensor and file, and how many more there are.
        """
        expected = expected_tensors(self.spec)
        config = self.path / CONFIG_FILE
        problems = [f"{self.path}: missing tensor {name} {list(shape)} that {config} implies"
                    for name, shape in expected.items() if name not in self._tensors]
        for name, t in self._tensors.items():
            base = _companion_of(name)
            where = t.describe() + ("" if t.key == name else f" (as {name})")
            if name in expected:
                if self._is_quantized_weight(name):
                    continue  # packed layout: quant/ checks it against its scales
                if t.shape != expected[name]:
                    problems.append(f"{where}: shape {list(t.shape)}, but {config} implies {list(expected[name])}")
                elif t.dtype not in DTYPES or not DTYPES[t.dtype].is_floating_point:
                    problems.append(f"{where}: dtype {t.dtype}, expected a floating-point type")
            elif base in expected and self.quantized:
                continue
            elif base in expected:
                problems.append(f"{where}: quantization tensor in a checkpoint without {QUANT_CONFIG_FILE}")
            else:
                problems.append(f"{where}: unexpected tensor, not part of the model {config} describes")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise CheckpointError(problems[0] + more)

    def fingerprint(self) -> str:
        """A cheap, stable hash of the checkpoint (16 hex digits).

        Covers config.json, the index, hf_quant_config.json and the tokenizer files byte for byte, and
        for each safetensors file its name, size and header (names, dtypes, shapes, offsets). It is NOT
        a hash of the tensor data: rewriting weights in place with the same shapes keeps it.
        """
        h = hashlib.sha256()
        extra = [self.path / CONFIG_FILE, self.path / INDEX_FILE, self.path / QUANT_CONFIG_FILE]
        for p in extra + self.tokenizer_files():
            if p.is_file():
                h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
                h.update(p.read_bytes())
        for f in self._files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
                h.update(fh.read(n))
        return h.hexdigest()[:16]

    # ---- internals ---------------------------------------------------------------------------------
    def _stored(self, name: str) -> StoredTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name}") from None

    def _is_quantized_weight(self, name: str) -> bool:
        return (self.quantized and name.endswith(".weight")
                and f"{name[:-len('weight')]}{QUANT_SUFFIXES[0]}" in self._tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._tensors)} tensors, pattern {self.spec.pattern!r})"


# ---- naming -------------------------------------------------------------------------------------------
def canonical_name(key: str) -> str:
    """The canonical name of a stored tensor name; a fused expert tensor gives `...experts.{e}.<proj>.weight`."""
    for prefix, replacement in (("model.language_model.", "model."), ("language_model.", "")):
        if key.startswith(prefix):
            key = replacement + key[len(prefix):]
            break
    if key.startswith("model."):
        key = "backbone." + key[len("model."):]
    if key.startswith("backbone.mtp."):
        key = key[len("backbone."):]
    if key == "backbone.embedding.weight":
        return EMBEDDING
    fused = _FUSED_EXPERTS.match(key)
    if fused:
        return f"{fused['prefix']}.{{e}}.{fused['proj']}.weight"
    return key


def _canonical(t: StoredTensor) -> list[tuple[str, StoredTensor]]:
    """(canonical name, where) for one stored tensor: E entries for a fused [E, out, in] expert tensor."""
    name = canonical_name(t.key)
    if "{e}" not in name:
        return [(name, t)]
    if len(t.stored_shape) != 3:
        raise CheckpointError(f"{t.file}: fused expert tensor {t.key} has shape {list(t.stored_shape)}, "
                              "expected 3 dimensions [experts, out, in]")
    return [(name.format(e=e), StoredTensor(t.file, t.key, t.dtype, t.stored_shape, e))
            for e in range(t.stored_shape[0])]


def _companion_of(name: str) -> str | None:
    """`X.weight` for a quantization companion `X.<suffix>` (QUANT_SUFFIXES), else None."""
    head, _, last = name.rpartition(".")
    return f"{head}.weight" if head and last in QUANT_SUFFIXES else None


# ---- files --------------------------------------------------------------------------------------------
def _read_spec(path: Path) -> ModelSpec:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a Hugging Face checkpoint folder")
    config = _read_json(config_path)
    if config.get("model_type") != "nemotron_h":
        for key in ("text_config", "llm_config"):  # vision-language checkpoints nest the language model's
            if isinstance(config.get(key), dict):
                return ModelSpec.from_config(config[key], source=f"{config_path} ({key})")
    return ModelSpec.from_config(config, source=str(config_path))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def _stored_from_files(path: Path) -> list[StoredTensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{path / pickles[0]}: pickled checkpoints are not read (unsafe); convert the "
                                  "checkpoint to safetensors, e.g. save_pretrained(..., safe_serialization=True)")
        raise CheckpointError(f"{path}: no weights (neither {INDEX_FILE} nor *.safetensors)")
    return [t for f in files for t in read_header(f).values()]


def _stored_from_index(index: Path) -> list[StoredTensor]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    headers: dict[str, dict[str, StoredTensor]] = {}
    stored = []
    for key, shard in weight_map.items():
        if shard not in headers:
            file = index.parent / str(shard)
            if not file.is_file():
                raise CheckpointError(f"{index}: weight_map puts {key} in shard {shard}, which does not exist")
            headers[shard] = read_header(file)
        if key not in headers[shard]:
            raise CheckpointError(f"{index}: weight_map puts {key} in shard {shard}, which does not hold it")
        stored.append(headers[shard][key])
    return stored


def read_header(file: Path) -> dict[str, StoredTensor]:
    """Parse a safetensors header and check it against the file's size: key -> StoredTensor.

    Layout: 8-byte little-endian header length n, n bytes of JSON {key: {dtype, shape, data_offsets}},
    then the data; offsets are relative to the end of the header.
    """
    size = file.stat().st_size
    corrupt = f"{file}: truncated or corrupt safetensors file"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{corrupt} ({size} bytes, shorter than the 8-byte header length)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{corrupt} (header of {n} bytes, but the file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{corrupt} (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{corrupt} (header is not a JSON object)")
    data_bytes = size - 8 - n
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{corrupt} (bad header entry for tensor {key})") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes):
            raise CheckpointError(f"{corrupt} (tensor {key} has data_offsets {[begin, end]}, "
                                  f"beyond the {data_bytes} data bytes)")
        if dtype in DTYPES:
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * DTYPES[dtype].itemsize:
                raise CheckpointError(f"{corrupt} (tensor {key}: {end - begin} bytes for {dtype} {list(shape)})")
        out[key] = StoredTensor(file, key, dtype, shape)
    return out
