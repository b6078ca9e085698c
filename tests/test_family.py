"""The Nemotron 3 family (export/presets.py): every member's config parses, plans, and a reduced random model
with its real layer pattern (MTP included) and its real head, state and group shapes gives transformers'
NemotronHForCausalLM's logits.

Reduced: hidden size, vocabulary, expert count and widths (and so the query- and Mamba-head counts, kept at
their smallest multiple of the real KV heads and groups), so that 108 layers run in a second on a CPU."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import add_missing_tensors, hf_model, save_hf_checkpoint

import nemo3
from nemo3.cli.plan import command as plan_command
from nemo3.export.planner import plan
from nemo3.export.presets import PRESETS
from nemo3.export.spec import ModelSpec

SEQ = 12
# what each member is, from its published config (export/presets.py): layers, M/E/*/- counts, MTP pattern,
# attention heads / KV heads / head dim, Mamba heads x head dim, state, groups, experts (top-k), latent
FAMILY = {
    "nano-4b": (42, (21, 0, 4, 17), "", (40, 8, 128), (96, 80, 128, 8), None, None),
    "nano": (52, (23, 23, 6, 0), "", (32, 2, 128), (64, 64, 128, 8), (128, 6), None),
    "lightning": (52, (23, 23, 6, 0), "*E", (32, 2, 128), (64, 64, 128, 8), (128, 6), None),
    "super": (88, (40, 40, 8, 0), "*E", (32, 2, 128), (128, 64, 128, 8), (512, 22), 1024),
    "ultra": (108, (48, 48, 12, 0), "*E", (64, 2, 128), (256, 64, 128, 8), (512, 22), 2048),
}


@pytest.mark.parametrize("name", FAMILY)
def test_config_parses_with_the_published_shapes(name):
    spec = ModelSpec.from_config(PRESETS[name], source=f"preset {name}")
    layers, counts, mtp, attention, mamba, experts, latent = FAMILY[name]
    assert len(spec.layer_types) == layers and spec.mtp_pattern == mtp
    assert tuple(spec.pattern.count(c) for c in "ME*-") == counts
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim) == attention
    assert (spec.mamba_num_heads, spec.mamba_head_dim, spec.ssm_state_size, spec.n_groups) == mamba
    if experts:
        assert (spec.n_routed_experts, spec.num_experts_per_tok) == experts and spec.moe_latent_size == latent



def test_parameter_totals_match_the_releases():
    """Shapes no reduced model checks (widths, shared experts): the published sizes. Nano 4B's hub page gives
    3,973,556,832 BF16 parameters; Ultra's BF16 repository holds 1121 GB (its shared experts' width alone moves
    that by 8 GB)."""
    def weight_bytes(name):
        return plan(ModelSpec.from_config(PRESETS[name]), "bf16", 1, gpu_memory=2**42, context=1).weights[0]["total"]
    assert weight_bytes("nano-4b") == 2 * 3_973_556_832
    assert round(weight_bytes("ultra") / 1e9) == 1121

def reduced(name: str) -> dict:
    """The member's config with small widths and few experts; pattern, MTP and per-head shapes unchanged."""
    cfg = dict(PRESETS[name])
    kv, groups = cfg["num_key_value_heads"], cfg["n_groups"]
    cfg.update(vocab_size=128, hidden_size=64, num_attention_heads=2 * kv, mamba_num_heads=groups,
               chunk_size=SEQ, intermediate_size=64, max_position_embeddings=4096)
    if "n_routed_experts" in cfg:
        cfg.update(n_routed_experts=8, num_experts_per_tok=min(cfg["num_experts_per_tok"], 3),
                   moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1)
        if cfg.get("moe_latent_size"):
            cfg["moe_latent_size"] = 32
    return cfg


@pytest.mark.parametrize("name", FAMILY)
def test_reduced_model_matches_transformers(name, tmp_path):
    config = reduced(name)
    hf = hf_model(config)
    folder = save_hf_checkpoint(hf, tmp_path / name)
    add_missing_tensors(folder)  # MTP layers: transformers has none (their logits are not compared)
    model = nemo3.load(folder)
    assert model.spec.pattern == ModelSpec.from_config(PRESETS[name]).pattern
    ids = torch.randint(0, config["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = model.logits(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("name", FAMILY)
def test_plan_preset(name):
    result = CliRunner().invoke(plan_command, ["--preset", name, "--precision", "bf16", "--tp", "8",
                                               "--gpu-memory", "80GiB"])
    assert result.exit_code == 0, result.output
    assert f"preset {name}" in result.output
