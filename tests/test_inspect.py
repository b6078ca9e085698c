"""export/inspect.py and `nemo3 inspect`: numbers against hand-computed ones, table and JSON output."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import hf_model, make_config, save_hf_checkpoint
from safetensors.torch import load_file, save_file

from nemo3.cli.main import main
from nemo3.export.inspect import describe_spec, parameter_counts, weight_group
from nemo3.export.names import expected_tensors
from nemo3.export.spec import ModelSpec

# Hand count for make_config() (V 96, D 32, pattern ME*ME). Mamba: H 4, P 8, N 8, G 2: I 32, conv 64,
# in_proj 100x32 = 3200, conv1d 64*4 + 64 = 320, dt_bias/A_log/D 12, norm 32, out_proj 32x32 = 1024,
# block norm 32: 4620. Attention: q 32x32, k 16x32, v 16x32, o 32x32 = 3072, norm 32: 3104.
# MoE: router 8x32 + bias 8 = 264, 8 experts x (16x32 + 32x16) = 8 x 1024, shared 2 x 24x32 = 1536,
# norm 32: 10024, active 10024 - 6 x 1024 = 3880. Embedding + lm_head + norm_f = 3072 + 3072 + 32.
PLAIN = dict(total=6176 + 2 * 4620 + 3104 + 2 * 10024, active=6176 + 2 * 4620 + 3104 + 2 * 3880,
             mtp_total=0, mtp_active=0)
# make_config("mtp"): latent 16, so an expert is 16x16 + 16x16 = 512 and a MoE block is 32 + 264 + 8 x 512
# + 1536 + latent 16x32 + 32x16 = 6952 (active 6952 - 6 x 512 = 3880). MTP pattern *E: block 0 = enorm,
# hnorm 64 + eh_proj 32x64 = 2048 + attention 3104 = 5216; block 1 = MoE 6952 + final_layernorm 32 = 6984.
MTP = dict(total=6176 + 2 * 4620 + 3104 + 2 * 6952, active=6176 + 2 * 4620 + 3104 + 2 * 3880,
           mtp_total=5216 + 6984, mtp_active=5216 + 6984 - 6 * 512)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """make_config("mtp") in bfloat16 with its MTP tensors added (transformers drops them)."""
    model = hf_model(make_config("mtp")).to(torch.bfloat16)
    folder = save_hf_checkpoint(model, tmp_path_factory.mktemp("inspect") / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    for name, value in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = value.float()  # as in NVIDIA's checkpoints
    spec = ModelSpec.from_file(folder)
    tensors |= {n: torch.zeros(s, dtype=torch.bfloat16)
                for n, s in expected_tensors(spec).items() if n.startswith("mtp.")}
    save_file(tensors, folder / "model.safetensors")
    return model, folder


@pytest.mark.parametrize("name, expected", [("plain_moe", PLAIN), ("mtp", MTP)])
def test_parameter_counts_by_hand(name, expected):
    spec = ModelSpec.from_config(make_config(name))
    assert parameter_counts(spec) == expected


def test_parameter_total_matches_transformers():
    model = hf_model(make_config())  # transformers has no MTP: its state dict is the backbone's
    assert parameter_counts(ModelSpec.from_config(make_config()))["total"] == sum(
        t.numel() for t in model.state_dict().values())


def test_layers_moe_and_state_by_hand():
    report = describe_spec(ModelSpec.from_config(make_config("mtp")))
    assert report["layers"] == dict(pattern="ME*ME", count=5, mamba=2, attention=1, moe=2, mlp=0)
    assert report["mtp"] == dict(steps=1, pattern="*E", layers=2)
    assert report["moe"] == dict(routed_experts=8, top_k=2, n_group=2, topk_group=1, expert_intermediate=16,
                                 shared_intermediate=24, latent_size=16, routed_scaling_factor=2.5)
    # SSM: 2 Mamba layers x [4, 8, 8] fp32; conv: 2 x 64 channels x 3 x bf16;
    # KV per token: (1 backbone + 1 MTP attention layer) x K and V x 2 heads x 8 x bytes
    assert report["state_bytes"] == dict(ssm_fp32=2 * 4 * 8 * 8 * 4, conv_bf16=2 * 64 * 3 * 2,
                                         kv_per_token_bf16=2 * 2 * 2 * 8 * 2, kv_per_token_fp8=2 * 2 * 2 * 8)


def test_no_moe_section_without_moe_layers():
    spec = ModelSpec.from_config(make_config(layers_block_type=["linear_attention", "mlp", "full_attention"]))
    assert describe_spec(spec)["moe"] is None
    assert parameter_counts(spec)["active"] == parameter_counts(spec)["total"]


def test_weight_groups():
    spec = ModelSpec.from_config(make_config("with_mlp", moe_latent_size=16))  # M - * E -
    groups = {weight_group(spec, n) for n in expected_tensors(spec)}
    assert groups == {"embedding", "norms", "mamba", "mlp", "attention", "router", "moe_experts", "shared_experts",
                      "latent_proj", "lm_head"}
    assert weight_group(spec, "backbone.layers.0.mixer.norm.weight") == "mamba"  # the gated norm is Mamba's
    assert weight_group(spec, "backbone.layers.0.norm.weight") == "norms"
    assert weight_group(spec, "backbone.layers.1.mixer.up_proj.weight") == "mlp"
    assert weight_group(spec, "backbone.layers.3.mixer.gate.e_score_correction_bias") == "router"


def test_inspect_json(checkpoint):
    result = CliRunner().invoke(main, ["inspect", str(checkpoint[1]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["parameters"] == MTP
    assert report["layers"]["pattern"] == "ME*ME" and report["mtp"]["pattern"] == "*E"
    assert report["dtypes"] == {"embedding": ["bfloat16"], "norms": ["bfloat16"], "mamba": ["bfloat16"],
                                "router": ["bfloat16", "float32"], "moe_experts": ["bfloat16"],
                                "shared_experts": ["bfloat16"], "latent_proj": ["bfloat16"],
                                "attention": ["bfloat16"], "lm_head": ["bfloat16"], "mtp": ["bfloat16"]}
    assert report["checkpoint"] == str(checkpoint[1]) and len(report["fingerprint"]) == 16


def test_inspect_table(checkpoint):
    result = CliRunner().invoke(main, ["inspect", str(checkpoint[1])])
    assert result.exit_code == 0, result.output
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.output.splitlines())
    assert rows["layers"] == "5: ME*ME  (mamba 2, attention 1, moe 2, mlp 0)"
    assert rows["mtp"] == "1 x *E (2 layers)"
    assert rows["parameters"] == f"{MTP['total']:,} (32.42K) total, {MTP['active']:,} (26.28K) active per token"
    assert rows["mtp parameters"].startswith(f"{MTP['mtp_total']:,} (12.20K) total, {MTP['mtp_active']:,}")
    assert rows["moe"].startswith("8 experts, top-2, 2 groups (top 1)") and "latent 16" in rows["moe"]
    assert rows["ssm state / seq"] == "2,048 B (2.00 KiB) (fp32)"
    assert rows["kv / token"] == "128 B (bf16), 64 B (fp8)"  # MTP's attention layer too
    assert rows["dtype router"] == "bfloat16, float32"


def test_inspect_defaults_to_builtin_model(checkpoint, monkeypatch):
    import nemo3.export.builtin as builtin

    monkeypatch.setattr(builtin, "BUILTIN_DIR", checkpoint[1])
    result = CliRunner().invoke(main, ["inspect", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["checkpoint"] == str(checkpoint[1])


def test_inspect_bad_checkpoint_is_one_line(tmp_path):
    model = hf_model(make_config("mtp"))
    folder = save_hf_checkpoint(model, tmp_path / "ckpt")  # no MTP tensors: does not match its config
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "missing tensor mtp.layers.0.enorm.weight" in result.output
