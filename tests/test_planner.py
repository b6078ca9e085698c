"""export/planner.py and `nemo3 plan`: planned weight bytes are the bytes the rank writer writes, the
presets reproduce the released checkpoints' parameter counts, per-sequence state follows the formulas,
and a plan that does not fit says what would."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import hf_model, make_config, write_json
from safetensors.torch import save_file
from test_sharding import SHARDABLE, make_tensors, spec_of, write_checkpoint

from nemo3.cli.plan import command
from nemo3.export.checkpoint import open_checkpoint
from nemo3.export.names import fp32_tensors
from nemo3.export.planner import parse_bytes, parse_tokens, plan
from nemo3.export.presets import PRESETS
from nemo3.export.rank_writer import write_ranks
from nemo3.export.spec import ModelSpec
from nemo3.quant.layout import linear_layouts
from nemo3.quant.recipes import load_recipe

GiB = 2**30


def rank_data_bytes(folder) -> int:
    """Bytes of tensor data in a safetensors file: its size minus the header."""
    path = folder / "model.safetensors"
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def test_planned_bf16_weights_are_the_bytes_written_for_a_transformers_checkpoint(tmp_path):
    """A checkpoint as the hub ships one (BF16, router biases fp32), from transformers' own weights."""
    config = make_config("latent_grouped", **SHARDABLE)
    model = hf_model(config)
    model.save_pretrained(tmp_path / "fp32")
    ckpt = open_checkpoint(tmp_path / "fp32")
    (tmp_path / "bf16").mkdir()
    write_json(tmp_path / "bf16" / "config.json", ckpt.spec.to_config())
    save_file({n: ckpt.get(n, torch.float32 if fp32_tensors(n) else torch.bfloat16) for n in ckpt.names()},
              tmp_path / "bf16" / "model.safetensors")
    for tp, moe in [(1, "ep"), (2, "tp"), (4, "ep")]:
        write_ranks(tmp_path / "bf16", tmp_path / f"ranks{tp}", tp, moe)
        planned = plan(ckpt.spec, "bf16", tp, moe).weights  # no recipe needed for bf16
        for r in range(tp):
            assert planned[r]["total"] == rank_data_bytes(tmp_path / f"ranks{tp}" / f"rank{r}")  # within 1% asked; exact


def recipes_of(spec: ModelSpec):
    """formats_for: each precision's built-in recipe (the CLI's default)."""
    return lambda precision: load_recipe(precision).assign(spec)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_planned_quantized_weights_are_the_bytes_written(tmp_path, precision):
    spec = spec_of("mtp")
    source = write_checkpoint(tmp_path / "ckpt", spec, make_tensors(spec, precision), quantized=True)
    # the layout checkpoint_tensors plans is the one quant/layout.py reads as ModelOpt's
    layouts = linear_layouts(open_checkpoint(source))
    quantized = {f"{layer}.weight": layout.weight_format for layer, layout in layouts.items()
                 if layout.weight_format != "bf16"}
    assert quantized == {n: f for n, f in load_recipe(precision).assign(spec).items() if f != "bf16"}
    assert {layout.output_scale for layout in layouts.values()} == {None, "k_scale", "v_scale"}
    for tp, moe in [(2, "ep"), (4, "tp")]:
        write_ranks(source, tmp_path / f"ranks{tp}", tp, moe)
        planned = plan(spec, precision, tp, moe, kv_dtype="fp8", formats_for=recipes_of(spec)).weights
        for r in range(tp):
            assert planned[r]["total"] == rank_data_bytes(tmp_path / f"ranks{tp}" / f"rank{r}")  # within 1% asked; exact


@pytest.fixture(scope="module")
def super_spec():
    return ModelSpec.from_config(PRESETS["super"])


def test_presets_have_the_released_shapes(super_spec):
    nano = ModelSpec.from_config(PRESETS["nano"])
    assert (nano.num_layers, nano.pattern.count("M"), nano.pattern.count("E"), nano.pattern.count("*")) == (52, 23, 23, 6)
    assert (super_spec.num_layers, super_spec.pattern.count("M"), super_spec.pattern.count("E"),
            super_spec.pattern.count("*"), super_spec.mtp_pattern) == (88, 40, 40, 8, "*E")
    # Super's BF16 checkpoint: 123,611,012,096 BF16 parameters and 41 x 512 fp32 router biases
    weights = plan(super_spec, "bf16", 1, gpu_memory=1024 * GiB, context=1).weights[0]
    assert weights["total"] == 2 * 123_611_012_096 + 4 * 41 * 512
    assert weights["mtp"] == 2 * 2_942_324_736 + 4 * 512


def test_super_nvfp4_at_tp4_fits_on_80gib_with_fp8_kv(super_spec):
    p = plan(super_spec, "nvfp4", 4, gpu_memory=80 * GiB, context=2**20, kv_dtype="fp8",
             formats_for=recipes_of(super_spec))
    per_rank = [w["total"] for w in p.weights]
    assert len(set(per_rank)) == 1  # ranks are alike: 128 experts each, one replicated KV head each
    assert 0.4 * 120e9 / 4 < per_rank[0] < 0.8 * 120e9 / 4  # ~0.6 byte per parameter at NVFP4 with its recipe
    assert p.weights[0]["moe_experts"] > 0.7 * per_rank[0]
    # per sequence and rank: 40 Mamba layers x 32 of 128 heads; 8 + 1 (MTP) attention layers x one KV head
    assert p.per_sequence["ssm_state"] == 40 * 32 * 64 * 128 * 4
    assert p.per_sequence["conv_state"] == 40 * (32 * 64 + 2 * 2 * 128) * 3 * 2
    assert p.per_sequence["kv_cache"] == 9 * 2 * 1 * 128 * 1 * 2**20
    free = int(80 * GiB * 0.9) - per_rank[0]
    assert p.fits and p.max_sequences == free // p.per_sequence["total"] > 10


def test_a_plan_that_does_not_fit_lists_changes_that_do():
    nano = ModelSpec.from_config(PRESETS["nano"])
    p = plan(nano, "bf16", 1, gpu_memory=80 * GiB, context=4 * 2**20, kv_dtype="bf16", formats_for=recipes_of(nano))
    assert not p.fits and p.max_sequences == 0
    tried = {s.split(":")[0].split(" ")[0]: s for s in p.suggestions}
    assert set(tried) == {"--tp", "--kv-dtype", "--precision", "--context"}, p.suggestions
    assert tried["--tp"].startswith("--tp 2:")
    for change in p.suggestions:  # each suggestion, applied alone, fits
        option, value = change.split(":")[0].split(" ")[:2]
        key = option[2:].replace("-", "_")
        value = int(value) if key in ("tp", "context") else value
        assert plan(nano, **{**dict(precision="bf16", tp=1, gpu_memory=80 * GiB, context=4 * 2**20,
                                    kv_dtype="bf16", formats_for=recipes_of(nano)), key: value}).fits, change
    longest = int(tried["--context"].split(" ")[1])
    assert not plan(nano, "bf16", 1, gpu_memory=80 * GiB, context=longest + 1, kv_dtype="bf16").fits


def test_plan_command(tmp_path):
    runner = CliRunner()
    result = runner.invoke(command, ["--preset", "nano", "--precision", "nvfp4", "--tp", "2", "--gpu-memory",
                                     "80GiB", "--context", "1M", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["tp"], out["context"], out["kv_dtype"], out["gpu_memory"]) == (2, 2**20, "fp8", 80 * GiB)
    assert out["fits"] and len(out["weights"]) == 2
    table = runner.invoke(command, ["--tp", "2", "--kv-dtype", "bf16"])  # the built-in model
    assert table.exit_code == 0 and "max concurrent sequences" in table.output and "fits: yes" in table.output
    bad = runner.invoke(command, ["--preset", "nano", "--tp", "3"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        "Error: --tp 3: backbone.embeddings.weight: vocab_size=131072 does not divide into 3 equal parts; "
        "valid --tp values for this model: 1, 2, 4, 8"]
    spec = spec_of("plain_moe")
    folder = write_checkpoint(tmp_path / "ckpt", spec, make_tensors(spec, "bf16"), quantized=False)
    from_checkpoint = runner.invoke(command, ["--checkpoint", str(folder), "--precision", "bf16", "--json"])
    assert json.loads(from_checkpoint.output)["weights"][0]["total"] == rank_data_bytes(folder)


def test_sizes_on_the_command_line():
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * GiB
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_tokens("1M") == 2**20 and parse_tokens("256K") == 2**18 and parse_tokens("131072") == 131072
    with pytest.raises(ValueError, match="--gpu-memory '80 parsecs'"):
        parse_bytes("80 parsecs")
