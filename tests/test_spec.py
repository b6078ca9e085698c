"""export/spec.py: every config error names key and value; both key styles give the same ModelSpec."""

from __future__ import annotations

import json
import math

import pytest
from conftest import CONFIGS, make_config

from nemo3.export.spec import ConfigError, ModelSpec


def config_error(cfg: dict, *parts: str) -> str:
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_config(cfg, source="ckpt/config.json")
    message = str(info.value)
    assert message.startswith("ckpt/config.json: ") and "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def hub_style(cfg: dict) -> dict:
    """The same config with the hub's keys: patterns as strings, older aliases."""
    letters = {"linear_attention": "M", "full_attention": "*", "moe": "E", "mlp": "-"}
    hub = {k: v for k, v in cfg.items() if k not in ("layers_block_type", "mtp_layers_block_type")}
    hub["hybrid_override_pattern"] = "".join(letters[t] for t in cfg["layers_block_type"])
    if cfg.get("mtp_layers_block_type"):
        hub["mtp_hybrid_override_pattern"] = "".join(letters[t] for t in cfg["mtp_layers_block_type"])
    for key, alias in (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"),
                       ("chunk_size", "mamba_chunk_size"), ("head_dim", "attention_head_dim")):
        hub[alias] = hub.pop(key)
    hub["time_step_limit"] = [0.0, math.inf]
    return hub


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hub_and_transformers_keys_give_equal_specs(name):
    cfg = make_config(name)
    cfg["time_step_limit"] = [0.0, {"__float__": "Infinity"}]  # how transformers writes infinity
    assert ModelSpec.from_config(hub_style(cfg)) == ModelSpec.from_config(cfg)


def test_hub_config_through_json(tmp_path):
    """A hub config.json as written to disk (Infinity literal, string patterns) reads like the dict."""
    hub = hub_style(make_config("mtp"))
    (tmp_path / "config.json").write_text(json.dumps(hub))
    spec = ModelSpec.from_file(tmp_path)
    assert spec == ModelSpec.from_config(make_config("mtp"))
    assert (spec.pattern, spec.mtp_pattern, spec.n_groups, spec.head_dim) == ("ME*ME", "*E", 2, 8)
    assert spec.time_step_limit == (0.0, math.inf)


def test_legacy_layer_names_and_alias_precedence():
    cfg = make_config(layers_block_type=["mamba", "moe", "attention", "mamba", "moe"], mamba_n_groups=4)
    spec = ModelSpec.from_config(cfg)
    assert spec.pattern == "ME*ME"
    assert spec.n_groups == 2  # the canonical key wins over its alias


def test_derived_sizes():
    spec = ModelSpec.from_config(make_config())
    # I = 4 x 8 = 32; conv channels I + 2 G N = 32 + 2*2*8 = 64; in_proj = I + conv + H = 100
    assert (spec.mamba_intermediate, spec.conv_dim, spec.in_proj_dim) == (32, 64, 100)
    assert spec.layers_of("M") == [0, 3] and spec.expert_dim == 32
    assert ModelSpec.from_config(make_config("latent_grouped")).expert_dim == 16


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, letter", [
    ("hybrid_override_pattern", "ME*XE", "'X'"),
    ("mtp_hybrid_override_pattern", "*Q", "'Q'"),
])
def test_unknown_layer_letter_hub_style(key, value, letter):
    cfg = hub_style(make_config("mtp"))
    cfg[key] = value
    config_error(cfg, f"{key}={value!r}", letter)


@pytest.mark.parametrize("key", ["layers_block_type", "mtp_layers_block_type"])
def test_unknown_layer_type_transformers_style(key):
    cfg = make_config("mtp")
    cfg[key] = [*cfg[key][:-1], "conv"]
    config_error(cfg, key, "'conv'")


@pytest.mark.parametrize("key, value", [("hybrid_override_pattern", ""), ("hybrid_override_pattern", 5),
                                        ("layers_block_type", []), ("layers_block_type", "ME")])
def test_malformed_pattern(key, value):
    cfg = {k: v for k, v in make_config().items() if k != "layers_block_type"}
    config_error({**cfg, key: value}, key, repr(value))


@pytest.mark.parametrize("overrides, parts", [
    (dict(mamba_num_heads=4, n_groups=3), ("n_groups=3", "mamba_num_heads=4")),
    (dict(num_attention_heads=4, num_key_value_heads=3), ("num_key_value_heads=3", "num_attention_heads=4")),
    (dict(n_routed_experts=8, n_group=3, topk_group=1), ("n_group=3", "n_routed_experts=8")),
    (dict(n_group=2, topk_group=3), ("topk_group=3", "n_group=2")),
    (dict(num_experts_per_tok=9), ("num_experts_per_tok=9", "n_routed_experts=8")),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), ("num_experts_per_tok=3", "topk_group=1")),
    (dict(moe_latent_size=0), ("moe_latent_size=0",)),
    (dict(moe_shared_expert_intermediate_size=-8), ("moe_shared_expert_intermediate_size=-8",)),
    (dict(tie_word_embeddings=True), ("tie_word_embeddings=True",)),
    (dict(model_type="llama"), ("model_type='llama'",)),
])
def test_inconsistent_values(overrides, parts):
    config_error(make_config(**overrides), *parts)


@pytest.mark.parametrize("key", [
    "vocab_size", "hidden_size", "layer_norm_epsilon",
    "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
    "num_attention_heads", "num_key_value_heads", "head_dim",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group",
    "routed_scaling_factor", "intermediate_size",
])
@pytest.mark.parametrize("value", [0, -2, "8", True])
def test_non_positive_or_non_numeric_size(key, value):
    config_error(make_config("with_mlp", **{key: value}), f"{key}={value!r}")


def test_sizes_of_absent_layer_types_are_not_checked():
    spec = ModelSpec.from_config(make_config(layers_block_type=["linear_attention", "full_attention"],
                                             n_routed_experts=0, intermediate_size=0))
    assert spec.pattern == "M*"


@pytest.mark.parametrize("drop, part", [("vocab_size", "'vocab_size'"), ("hidden_size", "'hidden_size'"),
                                        ("layers_block_type", "'hybrid_override_pattern'")])
def test_missing_required_key(drop, part):
    config_error({k: v for k, v in make_config().items() if k != drop}, part)


def test_mtp_without_pattern():
    config_error(make_config(num_nextn_predict_layers=1), "num_nextn_predict_layers=1", "mtp_hybrid_override_pattern")


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelSpec.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelSpec.from_file(tmp_path)


# ---- sizes, layer counts and round trips -------------------------------------------------------------------
def test_negative_mtp_layer_count_is_refused():
    config_error(make_config("mtp", num_nextn_predict_layers=-1), "num_nextn_predict_layers=-1")


def test_fractional_size_is_refused():
    config_error(make_config(hidden_size=32.5), "hidden_size=32.5")


def test_layer_count_must_match_pattern():
    config_error(make_config(num_hidden_layers=7), "num_hidden_layers=7")


def test_to_config_round_trip():
    spec = ModelSpec.from_config(make_config("mtp"))
    assert ModelSpec.from_config(spec.to_config()) == spec


def test_mtp_mamba_layers_count_in_state_bytes():
    base = ModelSpec.from_config(make_config("mtp"))
    with_mamba = ModelSpec.from_config(make_config("mtp", mtp_layers_block_type=["linear_attention", "moe"]))
    per_layer = base.mamba_num_heads * base.mamba_head_dim * base.ssm_state_size * 4
    assert with_mamba.ssm_state_bytes() == base.ssm_state_bytes() + per_layer
    assert with_mamba.kv_bytes_per_token() < base.kv_bytes_per_token()
