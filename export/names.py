"""The canonical tensor names of a Nemotron 3 checkpoint and the shape of each.

nemo3's canonical names are the hub checkpoints' names (what NVIDIA publishes and what ModelOpt's
unified export writes), with the embedding spelled `backbone.embeddings.weight`:

    backbone.embeddings.weight                         [V, D]
    backbone.layers.{i}.norm.weight                    [D]
    backbone.layers.{i}.mixer.<mixer tensors>          (below)
    backbone.norm_f.weight                             [D]
    lm_head.weight                                     [V, D]
    mtp.layers.{j}.{enorm,hnorm}.weight                [D]      first layer of each MTP step
    mtp.layers.{j}.eh_proj.weight                      [D, 2D]  first layer of each MTP step
    mtp.layers.{j}.norm.weight / .mixer.*              like a backbone layer
    mtp.layers.{j}.final_layernorm.weight              [D]      last layer of each MTP step

Routed experts are per-expert tensors `mixer.experts.{e}.up_proj.weight` [I, D_e] and
`...down_proj.weight` [D_e, I]. Every other naming (transformers' `model.*`, fused 3-D experts,
`backbone.embedding`) is mapped onto these by `export.checkpoint`.
"""

from __future__ import annotations

from .spec import ATTENTION, MAMBA, MLP, MOE, ModelSpec

EMBEDDING = "backbone.embeddings.weight"
FINAL_NORM = "backbone.norm_f.weight"
LM_HEAD = "lm_head.weight"


def mixer_tensors(spec: ModelSpec, letter: str) -> dict[str, tuple[int, ...]]:
    """Tensors of one mixer, relative to `...mixer.`."""
    D = spec.hidden_size
    out: dict[str, tuple[int, ...]] = {}
    if letter == MAMBA:
        H, I = spec.mamba_num_heads, spec.mamba_intermediate
        out["in_proj.weight"] = (spec.in_proj_dim, D)
        if spec.use_bias:
            out["in_proj.bias"] = (spec.in_proj_dim,)
        out["conv1d.weight"] = (spec.conv_dim, 1, spec.conv_kernel)
        if spec.use_conv_bias:
            out["conv1d.bias"] = (spec.conv_dim,)
        out["dt_bias"] = (H,)
        out["A_log"] = (H,)
        out["D"] = (H,)
        out["norm.weight"] = (I,)
        out["out_proj.weight"] = (D, I)
        if spec.use_bias:
            out["out_proj.bias"] = (D,)
    elif letter == ATTENTION:
        q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{name}.weight"] = (rows, D)
            if spec.attention_bias:
                out[f"{name}.bias"] = (rows,)
        out["o_proj.weight"] = (D, q)
        if spec.attention_bias:
            out["o_proj.bias"] = (D,)
    elif letter == MLP:
        out.update(_relu2_mlp("", D, spec.intermediate_size, spec.mlp_bias))
    elif letter == MOE:
        E, De = spec.n_routed_experts, spec.expert_dim
        out["gate.weight"] = (E, D)
        out["gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            out.update(_relu2_mlp(f"experts.{e}.", De, spec.moe_intermediate_size, spec.mlp_bias))
        if spec.moe_shared_expert_intermediate_size:
            out.update(_relu2_mlp("shared_experts.", D, spec.moe_shared_expert_intermediate_size, spec.mlp_bias))
        if spec.moe_latent_size:
            out["fc1_latent_proj.weight"] = (spec.moe_latent_size, D)
            out["fc2_latent_proj.weight"] = (D, spec.moe_latent_size)
            if spec.mlp_bias:
                out["fc1_latent_proj.bias"] = (spec.moe_latent_size,)
                out["fc2_latent_proj.bias"] = (D,)
    else:
        raise ValueError(f"unknown layer letter {letter!r}")
    return out


def _relu2_mlp(prefix: str, d_in: int, inter: int, bias: bool) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}up_proj.weight": (inter, d_in), f"{prefix}down_proj.weight": (d_in, inter)}
    if bias:
        out[f"{prefix}up_proj.bias"] = (inter,)
        out[f"{prefix}down_proj.bias"] = (d_in,)
    return out


def mtp_layer_count(spec: ModelSpec) -> int:
    return spec.num_nextn_predict_layers * len(spec.mtp_layer_types)


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `spec` must hold, canonical name -> shape."""
    D, V = spec.hidden_size, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {EMBEDDING: (V, D)}
    for i, letter in enumerate(spec.layer_types):
        out[f"backbone.layers.{i}.norm.weight"] = (D,)
        for name, shape in mixer_tensors(spec, letter).items():
            out[f"backbone.layers.{i}.mixer.{name}"] = shape
    out[FINAL_NORM] = (D,)
    out[LM_HEAD] = (V, D)
    steps = len(spec.mtp_layer_types)
    for j in range(mtp_layer_count(spec)):
        p = f"mtp.layers.{j}."
        if j % steps == 0:
            out[p + "enorm.weight"] = (D,)
            out[p + "hnorm.weight"] = (D,)
            out[p + "eh_proj.weight"] = (D, 2 * D)
        out[p + "norm.weight"] = (D,)
        for name, shape in mixer_tensors(spec, spec.mtp_layer_types[j % steps]).items():
            out[p + "mixer." + name] = shape
        if j % steps == steps - 1:
            out[p + "final_layernorm.weight"] = (D,)
    return out


def fp32_tensors(name: str) -> bool:
    """Tensors kept in fp32 whatever the checkpoint dtype (transformers' `_keep_in_fp32_modules`)."""
    return name.endswith("e_score_correction_bias")
