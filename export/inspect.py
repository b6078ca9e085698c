"""What a checkpoint is: layer pattern, parameter counts, MoE shape, per-sequence state, weight dtypes.

`inspect_checkpoint(path)` returns a JSON-ready dict; `format_report` renders it as a table.

Parameter counts are elements of every checkpoint tensor the config implies (`expected_tensors`;
router correction biases included), so they are those of the unquantized model whatever the storage.
"Active per token" is every parameter except the routed experts (embedding and lm_head included) plus
`num_experts_per_tok` routed experts in each MoE layer. MTP parameters are counted apart from the
backbone's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .names import EMBEDDING, FINAL_NORM, LM_HEAD, expected_tensors, fp32_tensors
from .spec import ATTENTION, MAMBA, MLP, MOE, ModelSpec

LAYER_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}
_ROUTED_EXPERT = re.compile(r"\.mixer\.experts\.(\d+)\.")
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """{total, active, mtp_total, mtp_active}: elements of the backbone (embedding and lm_head included)
    and of the MTP layers; active counts only the first top-k routed experts of each MoE layer."""
    counts = dict(total=0, active=0, mtp_total=0, mtp_active=0)
    for name, shape in expected_tensors(spec).items():
        n = math.prod(shape)
        part = "mtp_" if name.startswith("mtp.") else ""
        expert = _ROUTED_EXPERT.search(name)
        counts[part + "total"] += n
        if expert is None or int(expert.group(1)) < spec.num_experts_per_tok:
            counts[part + "active"] += n
    return counts


def weight_group(spec: ModelSpec, name: str) -> str:
    """The group a canonical tensor belongs to: embedding, norms, mamba, attention, mlp, router,
    moe_experts, shared_experts, latent_proj, lm_head or mtp."""
    if name == EMBEDDING:
        return "embedding"
    if name == LM_HEAD:
        return "lm_head"
    if name.startswith("mtp."):
        return "mtp"
    if name == FINAL_NORM or ".mixer." not in name:
        return "norms"
    if ".mixer.gate." in name:
        return "router"
    if ".mixer.experts." in name:
        return "moe_experts"
    if ".mixer.shared_experts." in name:
        return "shared_experts"
    if "_latent_proj." in name:
        return "latent_proj"
    layer = _LAYER.match(name)
    if layer is None:
        return "other"
    return LAYER_NAMES[spec.layer_types[int(layer.group(1))]]


def inspect_checkpoint(path: str | Path) -> dict:
    """Open and validate the checkpoint at `path` and describe it (a JSON-ready dict)."""
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    ckpt.validate()
    spec = ckpt.spec
    dtypes: dict[str, set[str]] = {}
    for name in ckpt.names():
        dtypes.setdefault(weight_group(spec, name), set()).add(str(ckpt.dtype(name)).removeprefix("torch."))
    return {"checkpoint": str(ckpt.path), "fingerprint": ckpt.fingerprint(), **describe_spec(spec),
            "dtypes": {group: sorted(d) for group, d in dtypes.items()}, "weight_bytes": weight_bytes(ckpt)}


def weight_bytes(ckpt) -> dict:
    """Bytes of the weights as stored (what a GPU keeps resident: NVFP4 and FP8 weights stay packed there) and
    as a BF16 model of the same config holds them (fp32 router biases in fp32 in both)."""
    import torch

    stored = sum(math.prod(ckpt.shape(name)) * ckpt.dtype(name).itemsize for name in ckpt.names())
    bf16 = sum(math.prod(shape) * (4 if fp32_tensors(name) else torch.bfloat16.itemsize)
               for name, shape in expected_tensors(ckpt.spec).items())
    return {"stored": stored, "bf16": bf16, "vs_bf16": round(stored / bf16, 3)}


def read_summary(ckpt) -> dict:
    """Validate an opened checkpoint's names, shapes and dtypes (safetensors headers) and summarize it: what the
    build's "read" stage records."""
    ckpt.validate()
    spec = ckpt.spec
    return {"checkpoint": str(ckpt.path.resolve()), "fingerprint": ckpt.fingerprint(), "pattern": spec.pattern,
            "mtp_pattern": spec.mtp_pattern, "tensors": len(ckpt.names()), "parameters": parameter_counts(spec)}


def describe_spec(spec: ModelSpec) -> dict:
    """Everything the report says that follows from the config alone."""
    moe = None
    if MOE in spec.all_layer_types:
        moe = dict(routed_experts=spec.n_routed_experts, top_k=spec.num_experts_per_tok, n_group=spec.n_group,
                   topk_group=spec.topk_group, expert_intermediate=spec.moe_intermediate_size,
                   shared_intermediate=spec.moe_shared_expert_intermediate_size, latent_size=spec.moe_latent_size,
                   routed_scaling_factor=spec.routed_scaling_factor)
    return {
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "layers": {"pattern": spec.pattern, "count": spec.num_layers,
                   **{name: len(spec.layers_of(letter)) for letter, name in LAYER_NAMES.items()}},
        "mtp": {"steps": spec.num_nextn_predict_layers, "pattern": spec.mtp_pattern,
                "layers": spec.num_nextn_predict_layers * len(spec.mtp_layer_types)},
        "parameters": parameter_counts(spec),
        "moe": moe,
        "state_bytes": {"ssm_fp32": spec.ssm_state_bytes(), "conv_bf16": spec.conv_state_bytes(2),
                        "kv_per_token_bf16": spec.kv_bytes_per_token(2),
                        "kv_per_token_fp8": spec.kv_bytes_per_token(1)},
    }


def format_report(report: dict) -> str:
    """The report as a two-column table."""
    layers, mtp, params, state = report["layers"], report["mtp"], report["parameters"], report["state_bytes"]
    counts = ", ".join(f"{name} {layers[name]}" for name in LAYER_NAMES.values())
    rows = [
        ("checkpoint", report["checkpoint"]),
        ("fingerprint", report["fingerprint"]),
        ("hidden, vocab", f"{report['hidden_size']}, {report['vocab_size']}"),
        ("layers", f"{layers['count']}: {layers['pattern']}  ({counts})"),
        ("mtp", f"{mtp['steps']} x {mtp['pattern']} ({mtp['layers']} layers)" if mtp["steps"] else "none"),
        ("parameters", f"{_count(params['total'])} total, {_count(params['active'])} active per token"),
    ]
    if mtp["steps"]:
        rows.append(("mtp parameters",
                     f"{_count(params['mtp_total'])} total, {_count(params['mtp_active'])} active per token"))
    moe = report["moe"]
    if moe:
        rows.append(("moe", f"{moe['routed_experts']} experts, top-{moe['top_k']}, {moe['n_group']} groups "
                            f"(top {moe['topk_group']}), expert intermediate {moe['expert_intermediate']}, "
                            f"shared {moe['shared_intermediate']}, latent {moe['latent_size'] or 'none'}, "
                            f"scale {moe['routed_scaling_factor']}"))
    rows += [
        ("ssm state / seq", f"{_bytes(state['ssm_fp32'])} (fp32)"),
        ("conv state / seq", f"{_bytes(state['conv_bf16'])} (bf16)"),
        ("kv / token", f"{_bytes(state['kv_per_token_bf16'])} (bf16), {_bytes(state['kv_per_token_fp8'])} (fp8)"),
    ]
    rows += [(f"dtype {group}", ", ".join(dtypes)) for group, dtypes in report["dtypes"].items()]
    weights = report["weight_bytes"]
    rows.append(("weights resident", f"{_bytes(weights['stored'])} as stored (GPU), {weights['vs_bf16']}x the "
                                     f"{_bytes(weights['bf16'])} of bf16"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} B ({n / scale:.2f} {unit})"
    return f"{n:,} B"
