"""Memory planner: per-rank weight bytes, per-sequence state, and how many sequences fit on a GPU.

    from nemo3.quant.recipes import load_recipe
    spec = ModelSpec.from_config(PRESETS["super"])
    p = plan(spec, precision="nvfp4", tp=4, gpu_memory=80 * 2**30, context=2**20, kv_dtype="fp8",
             formats_for=lambda precision: load_recipe(precision).assign(spec))
    print(format_plan(p))

Weights: every tensor a checkpoint of the model holds at `precision` (`checkpoint_tensors`: ModelOpt's
unified layout, quant/layout.py, for the formats the precision's recipe gives each layer), cut per
rank by the sharding rules (export/sharding.py), so the numbers are the bytes the rank writer
writes. Grouped by component (export/inspect.py's `weight_group`). The recipe comes in as data
(`formats_for`): export knows nothing of quant/.

Per sequence and rank: the SSM state [H/N, P, N_state] of every Mamba layer (fp32 by default, the
config's `mamba_ssm_cache_dtype`), the conv window [conv channels/N, K-1] (BF16 activations), and K
and V of every attention layer (MTP layers included) for `context` tokens in the KV dtype, with the
rank's KV heads (one replicated head when tp exceeds them), in whole pages (export/kv_pages.py: the runtime
admits sequences against the same page accounting, so "max concurrent sequences" is what it admits).

Fit: `gpu_memory * (1 - reserve)` must hold the rank's weights and at least one sequence; `reserve`
(default 10%) is held back for the CUDA context, activations, workspaces and communication buffers.
When it does not fit, the plan lists the single changes that make it fit: more ranks, an FP8 KV
cache, a smaller precision, a shorter context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .inspect import weight_group
from .kv_pages import DEFAULT_PAGE_SIZE, SequenceState, page_budget, pages_for
from .names import expected_tensors, fp32_tensors
from .options import PRECISIONS
from .sharding import (ShardError, blank_numbers, check_tp, expert_index, rank_layout, shard_of, split_name,
                       valid_tp)
from .spec import ATTENTION, MAMBA, ModelSpec

KV_DTYPES = {"fp32": 4, "bf16": 2, "fp8": 1}  # fp32: the CPU runtime's float32 builds
STATE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONV_STATE_BYTES = 2  # conv windows are kept in the activation dtype (BF16)
DEFAULT_RESERVE = 0.10
COMPONENTS = ("embedding", "lm_head", "mamba", "attention", "mlp", "moe_experts", "shared_experts", "router",
              "latent_proj", "norms", "mtp")

# tensor formats of quant/recipes.py (`Recipe.assign`): what each adds to the checkpoint
NVFP4_FORMATS = ("nvfp4", "nvfp4_w4a16")
FP8_FORMAT = "fp8"
FormatsFor = Callable[[str], dict[str, str]]  # precision -> {canonical tensor name: format}


def checkpoint_tensors(spec: ModelSpec, formats: dict[str, str] | None = None,
                       kv_cache: str = "bf16") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a checkpoint of `spec` holds (ModelOpt's unified export, quant/layout.py): name -> (shape, dtype).

    `formats` maps canonical tensor names to nvfp4, nvfp4_w4a16, fp8 or bf16 (a recipe's
    `Recipe.assign(spec)`; None: all bf16). Unquantized tensors are BF16 (router correction biases
    fp32); an NVFP4 weight [out, in] is uint8 [out, in/2] with float8 `weight_scale` [out, in/16] and
    fp32 0-dim `weight_scale_2` and (W4A4) `input_scale`; an FP8 weight is float8 with fp32 0-dim
    `weight_scale` and `input_scale`. An FP8 `kv_cache` adds fp32 0-dim `k_proj.k_scale` and
    `v_proj.v_scale` to every backbone attention layer (ModelOpt calibrates no MTP layer)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    scalar = ((), torch.float32)
    for name, shape in expected_tensors(spec).items():
        fmt = (formats or {}).get(name, "bf16")
        head = name[: -len("weight")]
        if fmt in NVFP4_FORMATS:
            *rows, cols = shape
            out[name] = ((*rows, cols // 2), torch.uint8)
            out[head + "weight_scale"] = ((*rows, cols // 16), torch.float8_e4m3fn)
            out[head + "weight_scale_2"] = scalar
            if fmt == "nvfp4":
                out[head + "input_scale"] = scalar
        elif fmt == FP8_FORMAT:
            out[name] = (shape, torch.float8_e4m3fn)
            out[head + "weight_scale"] = scalar
            out[head + "input_scale"] = scalar
        elif fmt == "bf16":
            out[name] = (shape, torch.float32 if fp32_tensors(name) else torch.bfloat16)
        else:
            raise ValueError(f"{name}: unknown format {fmt!r} (expected nvfp4, nvfp4_w4a16, fp8 or bf16)")
        if kv_cache == "fp8" and name.startswith("backbone.") and name.endswith(("k_proj.weight", "v_proj.weight")):
            out[head + ("k_scale" if name.endswith("k_proj.weight") else "v_scale")] = scalar
    return out


@dataclass
class Plan:
    """A plan for one rank layout; byte counts are per rank."""

    precision: str
    tp: int
    moe_parallel: str
    gpu_memory: int
    context: int
    kv_dtype: str
    reserve: float
    weights: list[dict[str, int]]  # per rank: component -> bytes, and "total"
    per_sequence: dict[str, int]  # ssm_state, conv_state, kv_cache, total (the same on every rank)
    reserve_bytes: int
    free_for_sequences: int  # on the fullest rank
    max_sequences: int
    num_pages: int  # KV pages of page_size tokens (export/kv_pages.py) for max_sequences sequences
    page_size: int
    fits: bool
    suggestions: list[str] = field(default_factory=list)
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plan(spec: ModelSpec, precision: str = "bf16", tp: int = 1, moe_parallel: str = "ep",
         gpu_memory: int = 80 * 2**30, context: int | None = None, kv_dtype: str = "bf16",
         reserve: float = DEFAULT_RESERVE, formats_for: FormatsFor | None = None, model: str = "") -> Plan:
    """Plan `spec` at `precision` over `tp` ranks of `gpu_memory` bytes each, for sequences of `context`
    tokens (default: max_position_embeddings) with a `kv_dtype` KV cache.

    `formats_for(precision)` gives every tensor's format under that precision's recipe, e.g.
    `lambda p: load_recipe(p).assign(spec)` with quant/recipes.py (export does not import quant);
    without it only bf16 can be planned and no other precision is suggested."""
    request = dict(precision=precision, tp=tp, moe_parallel=moe_parallel, gpu_memory=gpu_memory,
                   context=spec.max_position_embeddings if context is None else context, kv_dtype=kv_dtype,
                   reserve=reserve)
    cache: dict[str, dict[str, str] | None] = {}

    def formats(p: str) -> dict[str, str] | None:
        if p not in cache:
            if formats_for is None and p != "bf16":
                raise ValueError(f"--precision {p}: planning it needs its recipe's layer formats (formats_for)")
            cache[p] = formats_for(p) if formats_for is not None else None
        return cache[p]

    result = _plan(spec, formats, model=model, **request)
    if not result.fits:
        result.suggestions = _suggestions(spec, formats, request, result, precisions_known=formats_for is not None)
    return result


def _plan(spec: ModelSpec, formats: Callable[[str], dict[str, str] | None], precision: str, tp: int,
          moe_parallel: str, gpu_memory: int, context: int, kv_dtype: str, reserve: float, model: str = "") -> Plan:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"--kv-dtype {kv_dtype!r}: expected one of {', '.join(KV_DTYPES)}")
    if context < 1:
        raise ValueError(f"--context {context}: must be at least 1 token")
    if gpu_memory < 1:
        raise ValueError(f"--gpu-memory {gpu_memory}: must be positive")
    if not 0 <= reserve < 1:
        raise ValueError(f"--reserve {reserve}: must be a fraction in [0, 1)")
    tensors = checkpoint_tensors(spec, formats(precision), kv_dtype)
    check_tp(spec, tp, moe_parallel, tensors)
    weights = rank_weight_bytes(spec, tensors, tp, moe_parallel)
    state = sequence_state(spec, tp, kv_dtype)
    per_sequence = {"ssm_state": state.ssm, "conv_state": state.conv, "kv_cache": state.kv_bytes(context),
                    "total": state.bytes(context)}
    reserve_bytes = int(gpu_memory * reserve)
    free = gpu_memory - reserve_bytes - max(w["total"] for w in weights)
    budget = page_budget(free, state, context)
    return Plan(precision=precision, tp=tp, moe_parallel=moe_parallel, gpu_memory=gpu_memory, context=context,
                kv_dtype=kv_dtype, reserve=reserve, weights=weights, per_sequence=per_sequence,
                reserve_bytes=reserve_bytes, free_for_sequences=free, max_sequences=budget.max_sequences,
                num_pages=budget.num_pages, page_size=state.page_size, fits=budget.max_sequences >= 1, model=model)


def rank_weight_bytes(spec: ModelSpec, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], tp: int,
                      moe_parallel: str = "ep") -> list[dict[str, int]]:
    """Bytes each rank holds of `tensors` (name -> (shape, dtype)), by component, plus "total"."""
    per_rank = [dict.fromkeys(COMPONENTS, 0) for _ in range(tp)]
    sizes: dict[tuple, list[int]] = {}  # tensors that split alike: (blanked name, shape, dtype, expert owner)
    experts_per_rank = spec.n_routed_experts // tp if moe_parallel == "ep" and spec.n_routed_experts else 0
    for name, (shape, dtype) in tensors.items():
        base, _ = split_name(name)
        expert = expert_index(base)
        owner = expert // experts_per_rank if expert is not None and experts_per_rank else None
        key = (blank_numbers(name), tuple(shape), dtype, owner)
        if key not in sizes:
            sizes[key] = []
            for r in range(tp):
                shard = shard_of(name, shape, dtype, spec, tp, r, moe_parallel)
                sizes[key].append(0 if shard is None else math.prod(shard.shape(shape)) * dtype.itemsize)
        group = weight_group(spec, base)
        for r in range(tp):
            per_rank[r][group] = per_rank[r].get(group, 0) + sizes[key][r]
    for w in per_rank:
        w["total"] = sum(w.values())
    return per_rank


def sequence_state(spec: ModelSpec, tp: int, kv_dtype: str, conv_bytes: int = CONV_STATE_BYTES,
                   page_size: int = DEFAULT_PAGE_SIZE) -> SequenceState:
    """One sequence's state on each rank (export/kv_pages.py): SSM state and conv windows (fixed), and the K and
    V of one page of every attention layer (MTP included) in `kv_dtype` (a key of KV_DTYPES)."""
    layout = rank_layout(spec, tp, 0)
    types = list(spec.layer_types) + [spec.mtp_layer_types[j % len(spec.mtp_layer_types)]
                                      for j in range(spec.num_nextn_predict_layers * len(spec.mtp_layer_types))]
    ssm = conv = per_page = 0
    if MAMBA in types:
        heads = layout["mamba_heads"][1] - layout["mamba_heads"][0]
        groups = layout["mamba_groups"][1] - layout["mamba_groups"][0]
        channels = heads * spec.mamba_head_dim + 2 * groups * spec.ssm_state_size
        ssm_bytes = STATE_DTYPE_BYTES.get(spec.mamba_ssm_cache_dtype, 4)
        ssm = types.count(MAMBA) * heads * spec.mamba_head_dim * spec.ssm_state_size * ssm_bytes
        conv = types.count(MAMBA) * channels * (spec.conv_kernel - 1) * conv_bytes
    if ATTENTION in types:
        kv_heads = layout["kv_heads"][1] - layout["kv_heads"][0]
        per_page = types.count(ATTENTION) * 2 * kv_heads * spec.head_dim * KV_DTYPES[kv_dtype] * page_size
    return SequenceState(ssm=ssm, conv=conv, per_page=per_page, page_size=page_size)


def _suggestions(spec: ModelSpec, formats: Callable[[str], dict[str, str] | None], request: dict, p: Plan,
                 precisions_known: bool) -> list[str]:
    """Single changes that make `p` fit, or what it takes when none does."""
    def fits(**change) -> Plan | None:
        try:
            q = _plan(spec, formats, **{**request, **change})
        except ShardError:
            return None
        return q if q.fits else None

    out = []
    tensors = checkpoint_tensors(spec, formats(p.precision), p.kv_dtype)
    larger_tp = [n for n in valid_tp(spec, p.moe_parallel, tensors) if n > p.tp]
    for n in larger_tp:
        if q := fits(tp=n):
            out.append(f"--tp {n}: {_gib(q.weights[0]['total'])} of weights per rank, "
                       f"{q.max_sequences} sequences fit")
            break
    if p.kv_dtype == "bf16" and (q := fits(kv_dtype="fp8")):
        out.append(f"--kv-dtype fp8: {q.max_sequences} sequences fit")
    smaller = PRECISIONS[PRECISIONS.index(p.precision) + 1:] if precisions_known else ()
    for precision in smaller:
        if q := fits(precision=precision):
            out.append(f"--precision {precision}: {_gib(q.weights[0]['total'])} of weights per rank, "
                       f"{q.max_sequences} sequences fit")
            break
    stateless = p.per_sequence["ssm_state"] + p.per_sequence["conv_state"]
    kv_per_page = p.per_sequence["kv_cache"] // pages_for(p.context, p.page_size)
    room = p.free_for_sequences - stateless
    if kv_per_page and room >= kv_per_page:
        out.append(f"--context {room // kv_per_page * p.page_size} or shorter: one sequence fits")
    if not out:
        most = dict(tp=larger_tp[-1] if larger_tp else p.tp, kv_dtype="fp8",
                    precision="nvfp4" if precisions_known else p.precision)
        text = f"--tp {most['tp']} --precision {most['precision']} --kv-dtype fp8"
        if q := fits(**most):
            out.append(f"{text} together: {q.max_sequences} sequences fit")
        else:
            out.append(f"nothing fits in {_gib(p.gpu_memory)} per GPU, even with {text}: "
                       "use GPUs with more memory")
    return out


# ---- sizes on the command line ----------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str, option: str = "--gpu-memory") -> int:
    """'80GiB', '80GB', '141G' (G, M, K alone are binary), '85899345920' -> bytes."""
    return _parse(text, option, _UNITS)


def parse_tokens(text: str, option: str = "--context") -> int:
    """'1M' (= 2**20), '256K', '131072' -> tokens."""
    return _parse(text, option, {"": 1, "k": 2**10, "m": 2**20})


def _parse(text: str, option: str, units: dict[str, int]) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"{option} {text!r}: expected a number with an optional unit "
                         f"({', '.join(u for u in units if u) or 'none'})")
    return int(float(m.group(1)) * units[m.group(2).lower()])


# ---- report -------------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(p: Plan) -> str:
    """The plan as a table: weights by component per rank (one column when all ranks are alike)."""
    columns = [p.weights[0]] if all(w == p.weights[0] for w in p.weights) else p.weights
    heads = ["each rank"] if len(columns) == 1 else [f"rank {r}" for r in range(len(columns))]
    width = 28

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<{width}}" + "".join(f"{v:>14}" for v in values)

    lines = [f"{p.model or 'model'}: {p.precision}, --tp {p.tp} (routed experts: {p.moe_parallel}), "
             f"context {p.context:,} tokens, KV cache {p.kv_dtype}, {_gib(p.gpu_memory)} per GPU",
             "weights" + " " * (width - 5) + "".join(f"{h:>14}" for h in heads)]
    for component in COMPONENTS + ("total",):
        if any(c.get(component) for c in columns) or component == "total":
            lines.append(row(component, [_gib(c.get(component, 0)) for c in columns]))
    s = p.per_sequence
    lines += ["per sequence (each rank)",
              row("ssm state", [_gib(s["ssm_state"])]),
              row("conv state", [_gib(s["conv_state"])]),
              row(f"kv cache ({p.kv_dtype})", [_gib(s["kv_cache"])]),
              row("total", [_gib(s["total"])]),
              "memory (fullest rank)",
              row(f"reserve ({p.reserve:.0%})", [_gib(p.reserve_bytes)]),
              row("free for sequences", [_gib(max(p.free_for_sequences, 0))]),
              row("max concurrent sequences", [str(p.max_sequences)]),
              row(f"kv pages ({p.page_size} tokens each)", [f"{p.num_pages:,}"]),
              f"fits: {'yes' if p.fits else 'no'}"]
    lines += [f"  try {s}" for s in p.suggestions]
    return "\n".join(lines)
