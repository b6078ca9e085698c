"""Recipes: the tables, user files, errors, and the ModelOpt config on transformers' NemotronHForCausalLM."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml
from conftest import hf_model, make_config

from nemo3.export.names import expected_tensors
from nemo3.export.spec import ModelSpec
from nemo3.quant.recipes import RECIPES, Recipe, RecipeError, Rule, load_recipe

# the tiny model with a shared-expert width that NVFP4 blocks divide, so every recipe applies
TINY = make_config("latent_grouped", moe_shared_expert_intermediate_size=32)


def spec_of(config: dict) -> ModelSpec:
    return ModelSpec.from_config(config)


def real_spec(name: str) -> ModelSpec:
    """Nano / Super dimensions (DESIGN.md), small vocabulary: enough for names and shapes."""
    common = dict(model_type="nemotron_h", vocab_size=1024, num_attention_heads=32, num_key_value_heads=2,
                  head_dim=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4)
    if name == "nano":
        return spec_of(dict(common, hidden_size=2688, hybrid_override_pattern="ME" * 23 + "*" * 6,
                            mamba_num_heads=64, n_routed_experts=128, num_experts_per_tok=6,
                            moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712))
    return spec_of(dict(common, hidden_size=4096, hybrid_override_pattern="ME" * 40 + "*" * 8, mamba_num_heads=128,
                        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
                        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024,
                        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E"))


def formats_by_kind(assignment: dict[str, str]) -> dict[str, set[str]]:
    """Group an assignment by layer kind (`experts.up_proj`, `in_proj`, `gate`, `mtp`, ...)."""
    kinds: dict[str, set[str]] = {}
    for name, fmt in assignment.items():
        if name.startswith("mtp."):
            kind = "mtp"
        elif ".mixer." in name:
            kind = re.sub(r"\.\d+\.", ".", name.split(".mixer.")[1]).removesuffix(".weight")
        else:
            kind = name.removesuffix(".weight")
        kinds.setdefault(kind, set()).add(fmt)
    return kinds


NEVER_QUANTIZED = ["gate", "gate.e_score_correction_bias", "conv1d", "conv1d.bias", "norm", "A_log", "D", "dt_bias",
                   "backbone.embeddings", "backbone.norm_f", "lm_head", "mtp"]


@pytest.mark.parametrize("model", ["tiny", "nano", "super"])
def test_builtin_tables(model):
    spec = spec_of(make_config("mtp", moe_shared_expert_intermediate_size=32)) if model == "tiny" else real_spec(model)
    expected = {
        "nvfp4": {"experts.up_proj": "nvfp4", "experts.down_proj": "nvfp4", "shared_experts.up_proj": "fp8",
                  "shared_experts.down_proj": "fp8", "in_proj": "fp8", "out_proj": "fp8", "q_proj": "bf16",
                  "o_proj": "bf16", "fc1_latent_proj": "bf16", "fc2_latent_proj": "bf16"},
        "nvfp4-conservative": {"experts.up_proj": "nvfp4", "shared_experts.down_proj": "fp8", "in_proj": "bf16",
                               "out_proj": "bf16", "k_proj": "bf16"},
        "fp8": {"experts.up_proj": "fp8", "shared_experts.up_proj": "fp8", "in_proj": "fp8", "q_proj": "fp8",
                "v_proj": "fp8", "o_proj": "fp8", "fc1_latent_proj": "bf16", "fc2_latent_proj": "bf16"},
        "bf16": {"experts.up_proj": "bf16", "in_proj": "bf16", "q_proj": "bf16"},
        "nvfp4-all": {"experts.down_proj": "nvfp4", "shared_experts.down_proj": "nvfp4", "in_proj": "nvfp4",
                      "out_proj": "nvfp4", "q_proj": "nvfp4", "o_proj": "nvfp4", "fc1_latent_proj": "nvfp4"},
    }
    for name, want in expected.items():
        assignment = RECIPES[name].assign(spec)
        assert set(assignment) == set(expected_tensors(spec))
        kinds = formats_by_kind(assignment)
        for kind, fmt in want.items():
            if kind in kinds:  # Nano has no latent projections
                assert kinds[kind] == {fmt}, (name, kind)
        for kind in NEVER_QUANTIZED:
            assert kinds.get(kind, {"bf16"}) == {"bf16"}, (name, kind)
    assert RECIPES["nvfp4"].kv_cache == "fp8" and RECIPES["bf16"].kv_cache == "bf16"
    assert {r.ssm_state for r in RECIPES.values()} == {"float32"}


def test_format_of_names_and_tensors():
    recipe = RECIPES["nvfp4"]
    assert recipe.format_of("backbone.layers.7.mixer.experts.511.down_proj") == "nvfp4"
    assert recipe.format_of("backbone.layers.7.mixer.experts.511.down_proj.weight") == "nvfp4"
    assert recipe.format_of("backbone.layers.0.mixer.in_proj.weight") == "fp8"
    assert recipe.format_of("backbone.layers.0.mixer.in_proj.bias") == "bf16"
    assert recipe.format_of("backbone.layers.1.mixer.gate.weight") == "bf16"
    assert recipe.format_of("backbone.layers.0.mixer.conv1d.weight") == "bf16"
    assert recipe.format_of("mtp.layers.1.mixer.experts.0.up_proj.weight") == "bf16"
    assert recipe.format_of("lm_head.weight") == "bf16"
    first_wins = Recipe("r", (Rule("*.experts.*", "fp8"), Rule("backbone.layers.*", "nvfp4")))
    assert first_wins.format_of("backbone.layers.1.mixer.experts.2.up_proj") == "fp8"
    assert first_wins.format_of("backbone.layers.1.mixer.shared_experts.up_proj") == "nvfp4"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_user_recipe_file_round_trips(tmp_path, suffix):
    for recipe in RECIPES.values():
        path = tmp_path / f"{recipe.name}{suffix}"
        text = json.dumps(recipe.to_dict()) if suffix == ".json" else yaml.safe_dump(recipe.to_dict())
        path.write_text(text)
        assert load_recipe(path) == recipe
        assert load_recipe(str(path)) == recipe


def test_user_yaml_recipe(tmp_path):
    path = tmp_path / "experts-w4a16.yml"
    path.write_text("""
kv_cache: fp8
layers:
  - {pattern: "backbone.layers.*.mixer.experts.*", format: nvfp4_w4a16}
  - {pattern: "backbone.layers.*.mixer.fc?_latent_proj", format: fp8, optional: true}
  - {pattern: "backbone.layers.0.mixer.in_proj", format: fp8}
""")
    recipe = load_recipe(path)
    assert recipe.name == "experts-w4a16" and recipe.kv_cache == "fp8" and recipe.ssm_state == "float32"
    plain = recipe.assign(spec_of(make_config("plain_moe")))  # no latent projections: the optional rule is fine
    assert plain["backbone.layers.1.mixer.experts.3.up_proj.weight"] == "nvfp4_w4a16"
    assert plain["backbone.layers.0.mixer.in_proj.weight"] == "fp8"
    assert plain["backbone.layers.3.mixer.in_proj.weight"] == "bf16"


@pytest.mark.parametrize("text, match", [
    ("layers: [{pattern: 'backbone.layers.*', format: int4}]", "'backbone.layers.*' has unknown format 'int4'"),
    ("kv_cache: int8", "kv_cache='int8'"),
    ("ssm_state: float64", "ssm_state='float64'"),
    ("precision: fp8", "unknown key 'precision'"),
    ("layers: [{pattern: 'backbone.layers.*'}]", r"layers\[0\]"),
    ("layers: {'backbone.layers.*': fp8}", "layers must be a list"),
    ("- just a list", "must be a mapping"),
    ("layers: [unclosed", "not valid YAML"),
])
def test_bad_user_recipe_names_file_and_field(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(path)
    assert "bad.yaml" in str(err.value)


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'nvfp5'.*nvfp4-conservative"):
        load_recipe("nvfp5")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.json")


@pytest.mark.parametrize("pattern", ["backbone.layer.*.mixer.experts.*",  # typo
                                     "backbone.layers.*.mixer.experts.*.weight",  # tensor, not layer
                                     "backbone.layers.*.mixer.gate",  # router: never quantized
                                     "backbone.layers.*.mixer.fc?_latent_proj"])  # plain_moe has none
def test_pattern_matching_no_layer_is_an_error(pattern):
    recipe = Recipe("typo", (Rule(pattern, "fp8"),))
    with pytest.raises(RecipeError, match=re.escape(f"pattern {pattern!r} matches no quantizable layer")):
        recipe.assign(spec_of(make_config("plain_moe")))
    Recipe("typo", (Rule(pattern, "fp8", optional=True),)).assign(spec_of(make_config("plain_moe")))


def test_nvfp4_needs_whole_blocks():
    # conftest's shared experts are 24 wide: their down_proj cannot be NVFP4 (ModelOpt's export refuses it too)
    with pytest.raises(RecipeError, match=r"shared_experts\.down_proj\.weight \[32, 24\] cannot be nvfp4"):
        RECIPES["nvfp4-all"].assign(spec_of(make_config("latent_grouped")))
    RECIPES["nvfp4"].assign(spec_of(make_config("latent_grouped")))  # FP8 there: fine


def test_modelopt_cfg_errors():
    mtp = spec_of(make_config("mtp", moe_shared_expert_intermediate_size=32))
    with pytest.raises(RecipeError, match="mtp.layers.1.mixer.experts.0.up_proj.weight cannot be fp8.*no MTP"):
        Recipe("r", (Rule("mtp.layers.*.mixer.experts.*", "fp8"),)).to_modelopt_quant_cfg(mtp)
    split = Recipe("r", (Rule("backbone.layers.1.mixer.experts.[0-3].*", "nvfp4"),
                         Rule("backbone.layers.*.mixer.experts.*", "fp8")))
    with pytest.raises(RecipeError, match="experts of backbone.layers.1 get different formats"):
        split.to_modelopt_quant_cfg(spec_of(TINY))


def test_modelopt_cfg_compact_for_super():
    cfg = RECIPES["nvfp4"].to_modelopt_quant_cfg(real_spec("super"))
    assert len(cfg["quant_cfg"]) == 14  # deny-all, 2 x 6 layer kinds, KV: one entry per kind, not per layer
    assert cfg["algorithm"] == "max"


def test_quantizer_attributes_are_modelopts_presets():
    from modelopt.torch.quantization import FP8_DEFAULT_CFG, FP8_KV_CFG, NVFP4_DEFAULT_CFG
    from modelopt.torch.quantization.config import QuantizerAttributeConfig as Attributes

    def preset(cfg, name):
        return Attributes(**next(e["cfg"] for e in cfg["quant_cfg"] if e["quantizer_name"] == name))

    entries = {e["quantizer_name"]: Attributes(**e["cfg"])
               for e in RECIPES["nvfp4"].to_modelopt_quant_cfg(spec_of(TINY))["quant_cfg"] if "cfg" in e}
    experts = "model.layers.*.mixer.experts."
    assert entries[experts + "up_proj_weight_quantizer"] == preset(NVFP4_DEFAULT_CFG, "*weight_quantizer")
    assert entries[experts + "down_proj_input_quantizer"] == preset(NVFP4_DEFAULT_CFG, "*input_quantizer")
    assert entries["model.layers.*.mixer.in_proj.weight_quantizer"] == preset(FP8_DEFAULT_CFG, "*weight_quantizer")
    assert entries["model.layers.*.mixer.out_proj.input_quantizer"] == preset(FP8_DEFAULT_CFG, "*input_quantizer")
    assert entries["model.layers.*.mixer.[kv]_bmm_quantizer"] == preset(FP8_KV_CFG, "*[kv]_bmm_quantizer")


# ---- on transformers' model ---------------------------------------------------------------------

def quantized(config: dict, quant_cfg: dict):
    """mtq.quantize a tiny NemotronHForCausalLM with a few random batches; -> {enabled quantizer name: quantizer}."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.nn import TensorQuantizer

    model = hf_model(config)
    batches = torch.randint(0, config["vocab_size"], (3, 2, 12), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, copy.deepcopy(quant_cfg), lambda m: [m(b, use_cache=False) for b in batches])
    return {n: q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled}


def intended_quantizers(recipe: Recipe, spec: ModelSpec) -> dict[str, str]:
    """ModelOpt quantizer name -> format, from the canonical assignment (written out independently)."""
    out = {}
    for name, fmt in recipe.assign(spec).items():
        if fmt == "bf16":
            continue
        expert = re.fullmatch(r"backbone\.layers\.(\d+)\.mixer\.experts\.(\d+)\.(\w+)\.weight", name)
        if expert:
            i, e, proj = expert.groups()
            weight = f"model.layers.{i}.mixer.experts.{proj}_weight_quantizers.{e}"
            act = f"model.layers.{i}.mixer.experts.{proj}_input_quantizer"
        else:
            module = name.removesuffix(".weight").replace("backbone.", "model.", 1)
            weight, act = f"{module}.weight_quantizer", f"{module}.input_quantizer"
        out[weight] = fmt
        if fmt != "nvfp4_w4a16":
            out[act] = fmt
    if recipe.kv_cache == "fp8":
        for i in spec.layers_of("*"):
            out[f"model.layers.{i}.mixer.k_bmm_quantizer"] = out[f"model.layers.{i}.mixer.v_bmm_quantizer"] = "fp8"
    return out


MIXED = Recipe("mixed", (Rule("backbone.layers.1.mixer.experts.*", "nvfp4_w4a16"),
                         Rule("backbone.layers.4.mixer.experts.*", "nvfp4"),
                         Rule("backbone.layers.0.mixer.in_proj", "fp8"),
                         Rule("backbone.layers.2.mixer.o_proj", "nvfp4"),
                         Rule("lm_head", "fp8")), kv_cache="bf16")


@pytest.mark.parametrize("name", [*RECIPES, "mixed"])
def test_quant_cfg_enables_exactly_the_recipe(name):
    recipe = MIXED if name == "mixed" else RECIPES[name]
    spec = spec_of(TINY)
    enabled = quantized(TINY, recipe.to_modelopt_quant_cfg(spec))
    intended = intended_quantizers(recipe, spec)
    assert set(enabled) == set(intended)
    for qname, fmt in intended.items():
        q = enabled[qname]
        if fmt.startswith("nvfp4"):
            assert q.num_bits == (2, 1) and q.block_sizes[-1] == 16 and q.block_sizes["type"] == "dynamic"
        else:
            assert q.num_bits == (4, 3) and q.block_sizes is None and q.axis is None
        assert q.amax is not None, f"{qname} was not calibrated"


def test_nvfp4_all_is_modelopts_stock_nvfp4():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    stock = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    stock["quant_cfg"] += mtq.FP8_KV_CFG["quant_cfg"]
    ours = RECIPES["nvfp4-all"].to_modelopt_quant_cfg(spec_of(TINY))
    assert set(quantized(TINY, ours)) == set(quantized(TINY, stock))
