"""Recipes: the tables, user files, errors, and the ModelOpt config on transformers' NemotronHForCausalLM."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml
from conftest import hf_model, make_config

from nemo3.quant.modelopt_cpu import cpu_static_nvfp4

from nemo3.export.names import expected_tensors
from nemo3.export.spec import ModelSpec
from nemo3.quant.modelopt_recipes import shipped
from nemo3.quant.recipe_tables import ALIASES
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
        assignment = load_recipe(name).assign(spec)
        assert set(assignment) == set(expected_tensors(spec))
        kinds = formats_by_kind(assignment)
        for kind, fmt in want.items():
            if kind in kinds:  # Nano has no latent projections
                assert kinds[kind] == {fmt}, (name, kind)
        for kind in NEVER_QUANTIZED:
            assert kinds.get(kind, {"bf16"}) == {"bf16"}, (name, kind)
    assert load_recipe("nvfp4").kv_cache == "fp8" and RECIPES["bf16"].kv_cache == "bf16"
    assert {r.ssm_state for r in RECIPES.values()} == {"float32"}


def test_format_of_names_and_tensors():
    recipe = load_recipe("nvfp4")
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
    load_recipe("nvfp4").assign(spec_of(make_config("latent_grouped")))  # FP8 there: fine


def test_modelopt_cfg_errors():
    mtp = spec_of(make_config("mtp", moe_shared_expert_intermediate_size=32))
    with pytest.raises(RecipeError, match="mtp.layers.1.mixer.experts.0.up_proj.weight cannot be fp8.*no MTP"):
        Recipe("r", (Rule("mtp.layers.*.mixer.experts.*", "fp8"),)).to_modelopt_quant_cfg(mtp)
    split = Recipe("r", (Rule("backbone.layers.1.mixer.experts.[0-3].*", "nvfp4"),
                         Rule("backbone.layers.*.mixer.experts.*", "fp8")))
    with pytest.raises(RecipeError, match="experts of backbone.layers.1 get different formats"):
        split.to_modelopt_quant_cfg(spec_of(TINY))


def test_modelopt_cfg_compact_for_super():
    cfg = RECIPES["nvfp4-conservative"].to_modelopt_quant_cfg(real_spec("super"))
    assert len(cfg["quant_cfg"]) == 10  # deny-all, 2 x 4 layer kinds, KV: one entry per kind, not per layer
    assert cfg["algorithm"] == "max"


def test_quantizer_attributes_are_modelopts_presets():
    from modelopt.torch.quantization import FP8_DEFAULT_CFG, FP8_KV_CFG, NVFP4_DEFAULT_CFG
    from modelopt.torch.quantization.config import QuantizerAttributeConfig as Attributes

    def preset(cfg, name):
        return Attributes(**next(e["cfg"] for e in cfg["quant_cfg"] if e["quantizer_name"] == name))

    entries = {e["quantizer_name"]: Attributes(**e["cfg"])
               for e in NVFP4_TABLE.to_modelopt_quant_cfg(spec_of(TINY))["quant_cfg"] if "cfg" in e}
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


# NVIDIA's Super NVFP4 layout as a nemo3 table (what `nvfp4` was before it became ModelOpt's own file)
NVFP4_TABLE = Recipe("nvfp4-table", (Rule("backbone.layers.*.mixer.experts.*", "nvfp4"),
                                     Rule("backbone.layers.*.mixer.shared_experts.*", "fp8"),
                                     Rule("backbone.layers.*.mixer.in_proj", "fp8"),
                                     Rule("backbone.layers.*.mixer.out_proj", "fp8")), kv_cache="fp8")
MIXED = Recipe("mixed", (Rule("backbone.layers.1.mixer.experts.*", "nvfp4_w4a16"),
                         Rule("backbone.layers.4.mixer.experts.*", "nvfp4"),
                         Rule("backbone.layers.0.mixer.in_proj", "fp8"),
                         Rule("backbone.layers.2.mixer.o_proj", "nvfp4"),
                         Rule("lm_head", "fp8")), kv_cache="bf16")


NVIDIA_CAN_BUILD = [name for name in shipped() if "Nano-4B" not in name]


@pytest.mark.parametrize("name", [*RECIPES, "mixed", "nvfp4-table", *NVIDIA_CAN_BUILD])
def test_quant_cfg_enables_exactly_the_recipe(name):
    """ModelOpt itself, applying the recipe's config to transformers' model, is the oracle for which layer
    gets which format (for NVIDIA's recipes: for nemo3's reading of ModelOpt's pattern matching)."""
    recipe = {"mixed": MIXED, "nvfp4-table": NVFP4_TABLE}.get(name) or load_recipe(name)
    spec = spec_of(TINY)
    with cpu_static_nvfp4():
        enabled = quantized(TINY, recipe.to_modelopt_quant_cfg(spec))
    intended = intended_quantizers(recipe, spec)
    assert set(enabled) == set(intended)
    static = recipe.modelopt is not None and recipe.modelopt.quantize["algorithm"]["method"] == "mse"
    for qname, fmt in intended.items():
        q = enabled[qname]
        if fmt.startswith("nvfp4"):
            dynamic_weight = qname.endswith("input_quantizer") or not static
            assert q.num_bits == (2, 1) and q.block_sizes[-1] == 16
            assert q.block_sizes["type"] == ("dynamic" if dynamic_weight else "static"), qname
        else:
            assert q.num_bits == (4, 3) and q.block_sizes is None and q.axis is None
        assert q.amax is not None, f"{qname} was not calibrated"


def test_nvfp4_is_nvidias_super_layout():
    """The `nvfp4` alias runs ModelOpt's Super nvfp4-max-calib file: the same layer formats as the table it
    replaced, on every model shape."""
    for spec in (spec_of(TINY), real_spec("nano"), real_spec("super")):
        assert load_recipe("nvfp4").assign(spec) == NVFP4_TABLE.assign(spec)
    assert load_recipe("nvfp4").modelopt.name == ALIASES["nvfp4"]
    assert load_recipe("nvfp4").to_modelopt_quant_cfg(spec_of(TINY))["algorithm"] == {"method": "max"}


def test_every_shipped_nemotron_recipe_builds_or_says_why():
    """Every NVIDIA Nemotron 3 PTQ recipe ModelOpt ships fits the built-in model, except Nano 4B's, which
    quantizes the embedding (NVFP4 W4A16): refused in one line that says so."""
    from nemo3.export.builtin import BUILTIN_DIR
    from nemo3.export.checkpoint import open_checkpoint

    spec = open_checkpoint(BUILTIN_DIR).spec
    assert len(shipped()) >= 5 and all(name.startswith("nvidia/NVIDIA-Nemotron-3") for name in shipped())
    assert set(ALIASES.values()) <= set(shipped())
    for name in shipped():
        recipe = load_recipe(name)
        if name in NVIDIA_CAN_BUILD:
            cfg = recipe.to_modelopt_quant_cfg(spec)
            assert set(recipe.assign(spec).values()) - {"bf16"}, name
            assert cfg["algorithm"]["method"] in ("max", "mse"), name
            continue
        with pytest.raises(RecipeError) as err:
            recipe.to_modelopt_quant_cfg(spec)
        assert str(err.value) == (f"recipe {name}: quantizes the embedding (weight_quantizer), which nemo3 keeps BF16: "
                                  "its runtime has no quantized embedding or conv1d")


def test_nano_4b_recipe_does_quantize_the_embedding():
    """The refusal above is true: ModelOpt, given Nano 4B's config, quantizes transformers' embedding."""
    name = next(n for n in shipped() if "Nano-4B" in n)
    enabled = quantized(TINY, copy.deepcopy(load_recipe(name).modelopt.quantize))
    assert "model.embeddings.weight_quantizer" in enabled


def test_w4a16_recipe_is_nvfp4_weight_only():
    recipe = load_recipe("nvfp4-w4a16")
    kinds = formats_by_kind(recipe.assign(real_spec("super")))
    assert kinds["experts.up_proj"] == kinds["shared_experts.down_proj"] == kinds["lm_head"] == {"nvfp4_w4a16"}
    assert kinds["in_proj"] == {"fp8"} and kinds["q_proj"] == kinds["fc1_latent_proj"] == kinds["mtp"] == {"bf16"}
    assert recipe.kv_cache == "fp8"
    assert recipe.to_modelopt_quant_cfg(real_spec("nano"))["algorithm"]["stop_multiplier"] == 1.5  # four over six


def test_modelopt_recipe_by_path_and_bad_files(tmp_path):
    path = shipped()[ALIASES["nvfp4-mse"]]
    by_path = load_recipe(path)
    assert by_path.modelopt.quantize == load_recipe("nvfp4-mse").modelopt.quantize and by_path.name == "nvfp4-mse"
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {recipe_type: ptq}\nquantize: {quant_cfg: 5}\n")
    with pytest.raises(RecipeError, match="bad.yaml: ModelOpt cannot load it"):
        load_recipe(bad)
    int8 = tmp_path / "int8.yaml"
    int8.write_text("metadata: {recipe_type: ptq}\nquantize:\n  quant_cfg:\n    - {quantizer_name: '*', enable: false}\n"
                    "    - {quantizer_name: '*mixer.in_proj.weight_quantizer', cfg: {num_bits: 8, axis: 0}}\n")
    with pytest.raises(RecipeError, match=r"backbone.layers.0.mixer.in_proj weight: num_bits=8 .* neither NVFP4"):
        load_recipe(int8).assign(spec_of(TINY))


def test_nvfp4_all_is_modelopts_stock_nvfp4():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    stock = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    stock["quant_cfg"] += mtq.FP8_KV_CFG["quant_cfg"]
    ours = RECIPES["nvfp4-all"].to_modelopt_quant_cfg(spec_of(TINY))
    assert set(quantized(TINY, ours)) == set(quantized(TINY, stock))


def test_recipes_command_lists_every_recipe_once():
    from click.testing import CliRunner

    from nemo3.cli.main import main as cli

    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [*RECIPES, *ALIASES, *shipped()]
    by_name = dict(zip(names, lines))
    assert "[alias of nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16/ptq/nvfp4-mse] mse, FP8 scale sweep calibration" \
        in by_name["nvfp4-mse"]
    assert "[ModelOpt] mse, four over six calibration: Lightning" in by_name[ALIASES["nvfp4-w4a16"]]
