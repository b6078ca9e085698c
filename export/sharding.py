"""Tensor and expert parallelism: which part of each canonical tensor rank r of N holds.

`--tp N` splits every layer Megatron-style: column-parallel projections (q/k/v, in_proj, up_proj) keep
the rows of the rank's heads or intermediate channels, row-parallel ones (o_proj, out_proj, down_proj)
the matching input columns and are followed by an all-reduce. `--moe-parallel` picks how routed
experts are split: `ep` gives each rank whole experts, `tp` a slice of every expert's intermediate
dimension.

RULES maps a canonical weight or bias name (export/names.py) to (axis, kind, unit): `unit` is the
ModelSpec field counting what the axis is made of (heads, groups, rows), which must divide by N.

    embeddings, lm_head               rows (vocab_size)
    q_proj / o_proj                   rows / columns by query heads
    k_proj, v_proj                    rows by KV heads; when N exceeds them each rank holds one whole
                                      head, rank r head r // (N / kv_heads) (replicated)
    in_proj                           rows per segment [z (I), x (I), B (G*N), C (G*N), dt (H)]:
                                      z, x, dt by heads, B, C by groups
    conv1d                            channels per segment [x, B, C] likewise
    A_log, D, dt_bias                 by heads
    mixer.norm (gated, I channels)    by groups (a norm group is the channels of one B/C group)
    out_proj                          columns by heads
    up_proj / down_proj               rows / columns by intermediate channels (MLP, shared expert, and
                                      routed experts with --moe-parallel tp)
    routed experts, ep                rank r holds experts [r*E/N, (r+1)*E/N) whole
    router, latent projections,       replicated
    norms, eh_proj, row-parallel
    biases

MTP layers (`mtp.layers.{j}.`) follow the rules of backbone layers of the same type.

Row-parallel biases are replicated; the network adds them once, after the all-reduce.

Expert numbering (ep): experts keep their global index in tensor names on every rank
(`mixer.experts.37.up_proj.weight` is expert 37 everywhere). The router is replicated and emits global
expert ids, so a rank keeps the (token, expert) pairs whose id falls in its range; the rank's
config.json records `expert_numbering: "global"` and the range (`rank_layout`).

Quantized tensors (ModelOpt's unified export): `X.weight_scale`, `X.weight_scale_2`, `X.input_scale`
(and `k_scale` / `v_scale`) follow `X.weight`'s rule. Per-tensor scales (0-dim or one element) are
copied whole to every rank holding any of X. An NVFP4 weight is uint8 [out, in/2] (two values per
byte) with float8 block scales [out, in/16]: split along `out`, both lose the same rows; split along
`in`, each rank's share must be whole 16-value blocks, i.e. in/2/N bytes of the weight and in/16/N
scales. An FP8 weight splits like a plain one.

Anything that does not divide is a ShardError naming the tensor and the dimension, and listing the
--tp values that work for the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .names import expected_tensors, fp32_tensors
from .options import MOE_PARALLEL
from .spec import ModelSpec

MAX_TP = 64  # the largest --tp that error messages and planners consider
NVFP4_BLOCK = 16

# kinds of rule
REPLICATED = "replicated"  # every rank holds the whole tensor
SPLIT = "split"  # `axis` cut into N equal parts of whole units
KV_HEADS = "kv_heads"  # split by KV heads, or one whole head per rank when N exceeds them
MAMBA_IN_PROJ = "mamba_in_proj"  # rows [z, x, B, C, dt], each segment split on its own
MAMBA_CONV = "mamba_conv"  # channels [x, B, C], each segment split on its own
EXPERT = "expert"  # ep: whole tensor on the owning rank; tp: like SPLIT

# companions of a quantized `X.weight`; the per-tensor ones are always copied whole
PER_TENSOR_SUFFIXES = ("weight_scale_2", "input_scale", "k_scale", "v_scale")
COMPANION_SUFFIXES = ("weight_scale",) + PER_TENSOR_SUFFIXES


class ShardError(ValueError):
    """A tensor or model that does not split over the requested ranks; the message names what and why."""


@dataclass(frozen=True)
class Rule:
    pattern: str  # regular expression for the whole canonical weight/bias name
    axis: int | None  # the axis split (None: never split)
    kind: str
    unit: str | None  # ModelSpec field counting the axis's units (heads, groups, rows)


_LAYER = r"(?:backbone|mtp)\.layers\.\d+\."
_MIXER = _LAYER + r"mixer\."
RULES: tuple[Rule, ...] = (
    Rule(r"backbone\.embeddings\.weight|lm_head\.weight", 0, SPLIT, "vocab_size"),
    # attention
    Rule(_MIXER + r"q_proj\.(?:weight|bias)", 0, SPLIT, "num_attention_heads"),
    Rule(_MIXER + r"[kv]_proj\.(?:weight|bias)", 0, KV_HEADS, "num_key_value_heads"),
    Rule(_MIXER + r"o_proj\.weight", 1, SPLIT, "num_attention_heads"),
    # Mamba-2
    Rule(_MIXER + r"in_proj\.(?:weight|bias)", 0, MAMBA_IN_PROJ, "mamba_num_heads"),
    Rule(_MIXER + r"conv1d\.(?:weight|bias)", 0, MAMBA_CONV, "mamba_num_heads"),
    Rule(_MIXER + r"(?:A_log|D|dt_bias)", 0, SPLIT, "mamba_num_heads"),
    Rule(_MIXER + r"norm\.weight", 0, SPLIT, "n_groups"),
    Rule(_MIXER + r"out_proj\.weight", 1, SPLIT, "mamba_num_heads"),
    # MLP layers, shared and routed experts
    Rule(_MIXER + r"up_proj\.(?:weight|bias)", 0, SPLIT, "intermediate_size"),
    Rule(_MIXER + r"down_proj\.weight", 1, SPLIT, "intermediate_size"),
    Rule(_MIXER + r"shared_experts\.up_proj\.(?:weight|bias)", 0, SPLIT, "moe_shared_expert_intermediate_size"),
    Rule(_MIXER + r"shared_experts\.down_proj\.weight", 1, SPLIT, "moe_shared_expert_intermediate_size"),
    Rule(_MIXER + r"experts\.\d+\.up_proj\.(?:weight|bias)", 0, EXPERT, "moe_intermediate_size"),
    Rule(_MIXER + r"experts\.\d+\.down_proj\.weight", 1, EXPERT, "moe_intermediate_size"),
    Rule(_MIXER + r"experts\.\d+\.down_proj\.bias", None, EXPERT, None),
    # replicated
    Rule(_MIXER + r"(?:o_proj|out_proj|down_proj|shared_experts\.down_proj)\.bias", None, REPLICATED, None),
    Rule(_MIXER + r"(?:gate\.weight|gate\.e_score_correction_bias|fc[12]_latent_proj\.(?:weight|bias))",
         None, REPLICATED, None),
    Rule(_LAYER + r"(?:norm|enorm|hnorm|final_layernorm)\.weight|backbone\.norm_f\.weight", None, REPLICATED, None),
    Rule(_LAYER + r"eh_proj\.weight", None, REPLICATED, None),
)
_COMPILED = [(re.compile(rule.pattern), rule) for rule in RULES]
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_NUMBERS = re.compile(r"\d+")
_rule_cache: dict[str, Rule] = {}  # name with its numbers blanked -> rule


@dataclass(frozen=True)
class Shard:
    """What one rank holds of a tensor: `ranges` [start, stop) along `axis`, concatenated in order.

    `axis` None: the whole tensor. Coordinates are those of the stored tensor (bytes of a packed
    NVFP4 weight, blocks of its scales)."""

    axis: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's part of `tensor` (a view of it when it is one range or the whole)."""
        if self.axis is None:
            return tensor
        parts = [tensor.narrow(self.axis, start, stop - start) for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.axis)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(shape)
        out = list(shape)
        out[self.axis] = sum(stop - start for start, stop in self.ranges)
        return tuple(out)


WHOLE = Shard()


class _Indivisible(Exception):
    """Internal: one tensor does not split; turned into a ShardError with the valid --tp values."""


def split_name(name: str) -> tuple[str, str | None]:
    """(`X.weight`, suffix) for a quantization companion `X.<suffix>`, else (name, None)."""
    head, _, last = name.rpartition(".")
    if head and last in COMPANION_SUFFIXES:
        return f"{head}.weight", last
    return name, None


def expert_index(name: str) -> int | None:
    """e for a routed expert's tensor `...mixer.experts.{e}....`, else None."""
    m = _EXPERT_INDEX.search(name)
    return int(m.group(1)) if m else None


def blank_numbers(name: str) -> str:
    """`name` with every number replaced by `#`: tensors whose blanked names match follow the same rule."""
    return _NUMBERS.sub("#", name)


def rule_of(name: str) -> Rule:
    """The rule for a canonical tensor name (companions follow their weight's rule)."""
    base, _ = split_name(name)
    key = blank_numbers(base)
    rule = _rule_cache.get(key)
    if rule is None:
        rule = next((r for pattern, r in _COMPILED if pattern.fullmatch(base)), None)
        if rule is None:
            raise ShardError(f"{name}: no sharding rule for this tensor (not a Nemotron 3 tensor name)")
        _rule_cache[key] = rule
    return rule


def check_args(tp: int, rank: int, moe_parallel: str) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise ShardError(f"--tp {tp!r}: must be a positive integer")
    if not 0 <= rank < tp:
        raise ShardError(f"rank {rank}: must be in [0, {tp}) for --tp {tp}")
    if moe_parallel not in MOE_PARALLEL:
        raise ShardError(f"--moe-parallel {moe_parallel!r}: expected one of {', '.join(MOE_PARALLEL)}")


def shard_of(name: str, shape: tuple[int, ...], dtype: torch.dtype, spec: ModelSpec, tp: int, rank: int,
             moe_parallel: str = "ep") -> Shard | None:
    """What rank `rank` of `tp` holds of tensor `name` stored with `shape` and `dtype`; None: nothing.

    Raises ShardError when the tensor does not split over `tp` ranks, naming the dimension and the
    --tp values that work for this model."""
    check_args(tp, rank, moe_parallel)
    try:
        return _shard_of(name, tuple(shape), dtype, spec, tp, rank, moe_parallel)
    except _Indivisible as e:
        valid = valid_tp(spec, moe_parallel, extra={name: (tuple(shape), dtype)})
        raise ShardError(f"--tp {tp}: {e}; {_valid_text(valid)}") from None


def shard_tensor(name: str, tensor: torch.Tensor, spec: ModelSpec, tp: int, rank: int,
                 moe_parallel: str = "ep") -> torch.Tensor | None:
    """Rank `rank`'s part of `tensor` (possibly a view of it), or None when the rank holds none of it."""
    shard = shard_of(name, tuple(tensor.shape), tensor.dtype, spec, tp, rank, moe_parallel)
    return None if shard is None else shard.apply(tensor)


def _shard_of(name: str, shape: tuple[int, ...], dtype: torch.dtype, spec: ModelSpec, tp: int, rank: int,
              moe_parallel: str) -> Shard | None:
    rule = rule_of(name)
    _, suffix = split_name(name)
    if rule.kind == EXPERT and moe_parallel == "ep":
        experts = _units(spec, "n_routed_experts", name, tp)
        index = expert_index(name)
        return WHOLE if index // (experts // tp) == rank else None
    per_tensor = suffix in PER_TENSOR_SUFFIXES or (suffix == "weight_scale" and _numel(shape) <= 1)
    if rule.axis is None or per_tensor or tp == 1:
        return WHOLE
    axis = rule.axis
    if axis >= len(shape):
        raise ShardError(f"{name}: shape {list(shape)} has no dimension {axis} to split")
    size = shape[axis]
    # an NVFP4 weight packs two values per byte along `in` (its last axis): split in whole 16-value blocks
    packed = dtype == torch.uint8 and suffix is None and axis == len(shape) - 1
    granule = NVFP4_BLOCK // 2 if packed else 1
    if rule.kind == KV_HEADS:
        heads = _positive(spec, rule.unit, name)
        if tp > heads:
            if tp % heads:
                raise _Indivisible(f"{name}: num_key_value_heads={heads} cannot be shared by {tp} ranks "
                                   "(--tp must divide it or be a multiple of it)")
            head = kv_head_of_rank(heads, tp, rank)
            return Shard(axis, ((head * size // heads, (head + 1) * size // heads),))
        segments = [(size, heads, rule.unit)]
    elif rule.kind in (MAMBA_IN_PROJ, MAMBA_CONV):
        segments = _mamba_segments(spec, rule.kind)
        if sum(s for s, _, _ in segments) != size:
            raise ShardError(f"{name}: {size} rows along dimension {axis}, but the config implies "
                             f"{sum(s for s, _, _ in segments)} ({_segment_text(rule.kind)})")
    else:
        segments = [(size, _positive(spec, rule.unit, name), rule.unit)]
    ranges, offset = [], 0
    for seg_size, units, unit in segments:
        if units % tp:
            raise _Indivisible(f"{name}: {unit}={units} does not divide into {tp} equal parts")
        if seg_size % (tp * granule):
            if not (packed or suffix == "weight_scale"):  # units divide, so the shape does not fit the config
                raise ShardError(f"{name}: dimension {axis} has {seg_size} entries, not a whole number for each "
                                 f"of {unit}={units}")
            what = f"{seg_size * 2} values packed two per byte" if packed else f"{seg_size} block scales"
            raise _Indivisible(f"{name}: dimension {axis} ({unit}) holds {what}, which do not split into {tp} "
                               f"parts of whole {NVFP4_BLOCK}-value NVFP4 blocks")
        part = seg_size // tp
        ranges.append((offset + rank * part, offset + (rank + 1) * part))
        offset += seg_size
    return Shard(axis, tuple(ranges))


def kv_head_of_rank(kv_heads: int, tp: int, rank: int) -> int:
    """With more ranks than KV heads (tp a multiple of them), the one KV head rank `rank` holds."""
    return rank // (tp // kv_heads)


def _mamba_segments(spec: ModelSpec, kind: str) -> list[tuple[int, int, str]]:
    """(rows, units, unit name) of each segment of in_proj's rows or conv1d's channels."""
    H, I, G = spec.mamba_num_heads, spec.mamba_intermediate, spec.n_groups
    GN = G * spec.ssm_state_size
    x_B_C = [(I, H, "mamba_num_heads"), (GN, G, "n_groups"), (GN, G, "n_groups")]
    if kind == MAMBA_CONV:
        return x_B_C
    return [(I, H, "mamba_num_heads")] + x_B_C + [(H, H, "mamba_num_heads")]


def _segment_text(kind: str) -> str:
    return "z, x, B, C, dt" if kind == MAMBA_IN_PROJ else "x, B, C"


def _positive(spec: ModelSpec, field: str, name: str) -> int:
    value = getattr(spec, field)
    if not isinstance(value, int) or value <= 0:
        raise ShardError(f"{name}: config {field}={value!r}, so this tensor should not exist")
    return value


def _units(spec: ModelSpec, field: str, name: str, tp: int) -> int:
    value = _positive(spec, field, name)
    if value % tp:
        raise _Indivisible(f"{name}: {field}={value} does not divide into {tp} equal parts")
    return value


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- whole-model checks ------------------------------------------------------------------------------
def logical_tensors(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of an unquantized checkpoint of `spec`: name -> (shape, dtype)."""
    return {name: (shape, torch.float32 if fp32_tensors(name) else torch.bfloat16)
            for name, shape in expected_tensors(spec).items()}


def _representatives(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """One tensor per (name with numbers blanked, shape, dtype): they all split alike."""
    seen = set()
    for name, (shape, dtype) in tensors.items():
        key = (blank_numbers(name), tuple(shape), dtype)
        if key not in seen:
            seen.add(key)
            yield name, tuple(shape), dtype


def _first_problem(reps: list, spec: ModelSpec, tp: int, moe_parallel: str) -> str | None:
    for name, shape, dtype in reps:
        try:
            _shard_of(name, shape, dtype, spec, tp, 0, moe_parallel)
        except _Indivisible as e:
            return str(e)
    return None


def valid_tp(spec: ModelSpec, moe_parallel: str = "ep",
             tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
             extra: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> list[int]:
    """The --tp values up to MAX_TP over which every tensor splits.

    `tensors` (name -> (shape, dtype)) defaults to the unquantized model's; `extra` adds tensors
    (e.g. quantized ones) to check as well."""
    all_tensors = dict(logical_tensors(spec) if tensors is None else tensors)
    all_tensors.update(extra or {})
    reps = list(_representatives(all_tensors))
    return [n for n in range(1, MAX_TP + 1) if _first_problem(reps, spec, n, moe_parallel) is None]


def check_tp(spec: ModelSpec, tp: int, moe_parallel: str = "ep",
             tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> None:
    """Raise ShardError unless every tensor (default: the unquantized model's) splits over `tp` ranks."""
    check_args(tp, 0, moe_parallel)
    tensors = logical_tensors(spec) if tensors is None else tensors
    reps = list(_representatives(tensors))
    problem = _first_problem(reps, spec, tp, moe_parallel)
    if problem is not None:
        valid = [n for n in range(1, MAX_TP + 1) if _first_problem(reps, spec, n, moe_parallel) is None]
        raise ShardError(f"--tp {tp}: {problem}; {_valid_text(valid)}")


def _valid_text(valid: list[int]) -> str:
    if valid == [1]:
        return "this model only runs with --tp 1"
    return f"valid --tp values for this model: {', '.join(map(str, valid))}"


# ---- what a rank holds, for its config.json and the planner -----------------------------------------
def rank_layout(spec: ModelSpec, tp: int, rank: int, moe_parallel: str = "ep") -> dict:
    """The [start, stop) ranges of heads, groups, experts, channels and vocabulary rows rank `rank` holds.

    Only the parts the model has are listed. `experts` are global expert indices (see the module
    docstring); `kv_heads` is one replicated head when tp exceeds the KV heads."""
    check_args(tp, rank, moe_parallel)
    types = set(spec.all_layer_types)

    def part(count: int) -> list[int]:
        return [rank * count // tp, (rank + 1) * count // tp]

    layout: dict = {"vocab": part(spec.vocab_size)}
    if "*" in types:
        kv = spec.num_key_value_heads
        head = kv_head_of_rank(kv, tp, rank) if tp > kv else None
        layout["attention_heads"] = part(spec.num_attention_heads)
        layout["kv_heads"] = [head, head + 1] if head is not None else part(kv)
    if "M" in types:
        layout["mamba_heads"] = part(spec.mamba_num_heads)
        layout["mamba_groups"] = part(spec.n_groups)
    if "-" in types:
        layout["mlp_intermediate"] = part(spec.intermediate_size)
    if "E" in types:
        E, inter = spec.n_routed_experts, spec.moe_intermediate_size
        layout["experts"] = part(E) if moe_parallel == "ep" else [0, E]
        layout["expert_intermediate"] = [0, inter] if moe_parallel == "ep" else part(inter)
        if spec.moe_shared_expert_intermediate_size:
            layout["shared_expert_intermediate"] = part(spec.moe_shared_expert_intermediate_size)
    return layout
