"""export/sharding.py and export/rank_writer.py: per-rank parts reassemble bit for bit, per-rank
transformers mixers sum to the full mixer, non-divisible splits fail naming the dimension, and the
rank files are valid safetensors holding exactly the shards."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_model, make_config, save_hf_checkpoint, write_json
from safetensors import safe_open
from safetensors.torch import save_file

from nemo3.export.checkpoint import open_checkpoint
from nemo3.export.names import expected_tensors
from nemo3.export.planner import checkpoint_tensors
from nemo3.export.rank_writer import write_ranks
from nemo3.export.sharding import ShardError, check_tp, rank_layout, shard_tensor, valid_tp
from nemo3.export.spec import ModelSpec
from nemo3.quant import fp8, nvfp4
from nemo3.quant.recipes import load_recipe

# Every count divides by 4 and every `in` dimension split by columns holds whole 16-value NVFP4
# blocks at tp 4: attention q 4 x 16, Mamba I = 8 x 8 in 4 groups, intermediate sizes 64.
SHARDABLE = dict(mamba_num_heads=8, mamba_head_dim=8, n_groups=4, head_dim=16, intermediate_size=64,
                 moe_intermediate_size=64, moe_shared_expert_intermediate_size=64)
CASES = ["latent_grouped", "with_mlp", "many_attention", "mtp"]


def spec_of(name: str, **overrides) -> ModelSpec:
    return ModelSpec.from_config(make_config(name, **{**SHARDABLE, **overrides}))


def make_tensors(spec: ModelSpec, recipe: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as a ModelOpt export of `recipe` lays them out (quant/layout.py): random
    weights, quantized with our NVFP4/FP8 numerics where the recipe says, KV-cache scales included."""
    g = torch.Generator().manual_seed(seed)
    formats = load_recipe(recipe).assign(spec)
    layout = checkpoint_tensors(spec, formats, load_recipe(recipe).kv_cache)
    out = {}
    for name, shape in expected_tensors(spec).items():
        w, head = torch.randn(shape, generator=g), name[: -len("weight")]
        if formats[name] == "nvfp4":
            q = nvfp4.quantize(w, name=name)
            out.update({name: q.packed, head + "weight_scale": q.block_scale, head + "weight_scale_2": q.global_scale,
                        head + "input_scale": torch.rand((), generator=g)})
        elif formats[name] == "fp8":
            out[name], out[head + "weight_scale"] = fp8.quantize_weight(w, name)
            out[head + "input_scale"] = torch.rand((), generator=g)
        else:
            out[name] = w.to(layout[name][1])
    for name in ("k_scale", "v_scale"):  # FP8 KV cache
        out.update({n: torch.rand((), generator=g) for n in layout if n.endswith(name)})
    assert {n: (tuple(t.shape), t.dtype) for n, t in out.items()} == layout
    return out


def reassemble(name: str, pieces: list, spec: ModelSpec, tp: int, moe: str) -> torch.Tensor:
    """The whole tensor back from the ranks' parts, by the issue's rules (independently of sharding.py)."""
    held = [p for p in pieces if p is not None]
    last = name.rsplit(".", 1)[-1]
    if held[0].dim() == 0:  # per-tensor scales: copied whole to every rank holding the weight
        assert all(same_bits(p, held[0]) for p in held), name
        return held[0]
    if ".experts." in name and ".shared_experts." not in name and moe == "ep":
        assert len(held) == 1, name
        return held[0]
    replicated = ("norm.weight" in name and ".mixer.norm." not in name) or "norm_f" in name or "gate." in name \
        or "latent_proj" in name or "eh_proj" in name or name.endswith(("o_proj.bias", "down_proj.bias"))
    if replicated:
        assert len(held) == tp and all(same_bits(p, held[0]) for p in held), name
        return held[0]
    kv = spec.num_key_value_heads
    if ("k_proj" in name or "v_proj" in name) and tp > kv:
        per_head = tp // kv
        for r in range(tp):  # ranks sharing a head hold identical copies
            assert same_bits(pieces[r], pieces[r - r % per_head]), name
        return torch.cat([pieces[h * per_head] for h in range(kv)], 0)
    if ".in_proj." in name or ".conv1d." in name:
        I, GN, H = spec.mamba_intermediate, spec.n_groups * spec.ssm_state_size, spec.mamba_num_heads
        sizes = [I, I, GN, GN, H] if ".in_proj." in name else [I, GN, GN]
        parts = [p.split([s // tp for s in sizes], 0) for p in pieces]
        return torch.cat([torch.cat([parts[r][s] for r in range(tp)], 0) for s in range(len(sizes))], 0)
    columns = (".o_proj." in name or ".out_proj." in name or ".down_proj." in name) and last != "bias"
    return torch.cat(pieces, 1 if columns else 0)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("recipe", ["bf16", "fp8", "nvfp4", "nvfp4-all"])
@pytest.mark.parametrize("moe", ["ep", "tp"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shards_reassemble_bit_for_bit(case, recipe, moe, tp):
    spec = spec_of(case)
    tensors = make_tensors(spec, recipe)
    held = 0
    for name, tensor in tensors.items():
        pieces = [shard_tensor(name, tensor, spec, tp, r, moe) for r in range(tp)]
        held += sum(p is not None for p in pieces)
        assert same_bits(reassemble(name, pieces, spec, tp, moe), tensor), name
    assert held > len(tensors)


def test_packed_nvfp4_shards_dequantize_to_the_shards_of_the_weight():
    """Columns split in whole blocks: each rank's (packed, block scales) decode to its columns, rows to its rows."""
    spec = spec_of("plain_moe")
    tensors = make_tensors(spec, "nvfp4-all")
    for prefix, moe in [("backbone.layers.1.mixer.experts.3.down_proj.", "tp"),
                        ("backbone.layers.0.mixer.in_proj.", "tp"), ("backbone.layers.2.mixer.o_proj.", "ep")]:
        full = nvfp4.dequantize(tensors[prefix + "weight"], tensors[prefix + "weight_scale"],
                                tensors[prefix + "weight_scale_2"])
        assert tensors[prefix + "weight"].dtype == torch.uint8
        for r in range(4):
            part = {s: shard_tensor(prefix + s, tensors[prefix + s], spec, 4, r, moe)
                    for s in ("weight", "weight_scale", "weight_scale_2")}
            mine = nvfp4.dequantize(part["weight"], part["weight_scale"], part["weight_scale_2"])
            expected = shard_tensor(prefix + "weight", full, spec, 4, r, moe)  # the same rule on the float weight
            assert torch.equal(mine, expected), (prefix, r)


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    spec = spec_of("plain_moe")  # 4 query heads, 2 KV heads of 16
    assert spec.num_key_value_heads == 2
    k = torch.randn(2 * 16, spec.hidden_size)
    name = "backbone.layers.2.mixer.k_proj.weight"
    for r in range(4):
        head = r // 2  # ranks 0, 1 share KV head 0; ranks 2, 3 head 1 (their query heads 2r, 2r+1 use it)
        assert torch.equal(shard_tensor(name, k, spec, 4, r), k[16 * head:16 * (head + 1)])
        assert rank_layout(spec, 4, r)["kv_heads"] == [head, head + 1]
        assert rank_layout(spec, 4, r)["attention_heads"] == [r, r + 1]


def test_expert_parallel_ranks_hold_contiguous_global_experts():
    spec = spec_of("plain_moe")  # 8 experts
    w = torch.randn(64, spec.hidden_size)
    for e in range(8):
        name = f"backbone.layers.1.mixer.experts.{e}.up_proj.weight"
        holders = [r for r in range(4) if shard_tensor(name, w, spec, 4, r, "ep") is not None]
        assert holders == [e // 2]
    assert [rank_layout(spec, 4, r, "ep")["experts"] for r in range(4)] == [[0, 2], [2, 4], [4, 6], [6, 8]]


def test_non_divisible_splits_name_the_dimension_and_the_valid_tp_values():
    spec = spec_of("plain_moe", mamba_num_heads=12, n_groups=4)
    with pytest.raises(ShardError) as info:
        check_tp(spec, 8)
    message = str(info.value)
    assert "mamba_num_heads=12" in message and "valid --tp values for this model: 1, 2, 4" in message
    with pytest.raises(ShardError, match=r"in_proj\.weight: mamba_num_heads=12 does not divide into 8"):
        shard_tensor("backbone.layers.0.mixer.in_proj.weight", torch.zeros(spec.in_proj_dim, 32), spec, 8, 0)
    # 3 ranks cannot share 2 KV heads
    with pytest.raises(ShardError, match=r"num_key_value_heads=2 cannot be shared by 3 ranks"):
        shard_tensor("backbone.layers.2.mixer.v_proj.weight", torch.zeros(32, 32), spec, 3, 0)
    # NVFP4 blocks: moe_intermediate_size 32 at tp 4 leaves 8 values per rank, half a block
    spec = spec_of("plain_moe", moe_intermediate_size=32)
    q = nvfp4.quantize(torch.randn(spec.hidden_size, 32))
    name = "backbone.layers.1.mixer.experts.0.down_proj.weight"
    with pytest.raises(ShardError) as info:
        shard_tensor(name, q.packed, spec, 4, 0, "tp")
    message = str(info.value)
    assert "moe_intermediate_size" in message and "16-value NVFP4 blocks" in message, message
    assert message.endswith("valid --tp values for this model: 1, 2"), message
    with pytest.raises(ShardError, match="16-value NVFP4 blocks"):
        shard_tensor(name[:-len("weight")] + "weight_scale", q.block_scale, spec, 4, 0, "tp")
    assert shard_tensor(name, q.packed, spec, 4, 0, "ep") is not None  # whole experts: nothing to cut
    assert valid_tp(spec, "tp", checkpoint_tensors(spec, load_recipe("nvfp4").assign(spec))) == [1, 2]
    with pytest.raises(ShardError, match="no sharding rule"):
        shard_tensor("backbone.layers.0.mixer.mystery.weight", torch.zeros(2), spec, 2, 0)


# ---- the shards compute what the whole layer computes (transformers' modules as the oracle) ---------------
def _rank_module(full_config: dict, layer: int, tp: int, moe: str, tensors: dict[str, torch.Tensor], r: int):
    """transformers' mixer of layer `layer` built at rank r's sizes, loaded with rank r's shards."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h import modeling_nemotron_h as hf

    spec = ModelSpec.from_config(full_config)
    c = dict(full_config, mamba_num_heads=spec.mamba_num_heads // tp, n_groups=spec.n_groups // tp,
             num_attention_heads=spec.num_attention_heads // tp,
             num_key_value_heads=max(1, spec.num_key_value_heads // tp),
             intermediate_size=spec.intermediate_size // tp,
             moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size // tp,
             moe_intermediate_size=spec.moe_intermediate_size // (tp if moe == "tp" else 1))
    config = NemotronHConfig(**c)
    config._attn_implementation = "eager"
    letter = spec.layer_types[layer]
    module = {"M": lambda: hf.NemotronHMamba2Mixer(config, layer), "*": lambda: hf.NemotronHAttention(config, layer),
              "E": lambda: hf.NemotronHMoE(config, layer),
              "-": lambda: hf.NemotronHMLP(config, intermediate_size=config.intermediate_size)}[letter]()
    prefix = f"backbone.layers.{layer}.mixer."
    state = {}
    for name, t in tensors.items():
        if name.startswith(prefix):
            part = shard_tensor(name, t, spec, tp, r, moe)
            if part is not None:
                state[name[len(prefix):]] = part
    if letter == "E":  # transformers fuses experts into [E, out, in]; experts other ranks hold are zero
        for proj in ("up_proj", "down_proj"):
            fused = torch.zeros_like(getattr(module.experts, proj))
            for e in range(spec.n_routed_experts):
                key = f"experts.{e}.{proj}.weight"
                if key in state:
                    fused[e] = state.pop(key)
            state[f"experts.{proj}"] = fused
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.mark.parametrize("case,tp,moe", [("latent_grouped", 4, "ep"), ("latent_grouped", 2, "tp"),
                                         ("with_mlp", 4, "tp"), ("many_attention", 2, "ep")])
def test_rank_mixers_sum_to_the_full_mixer(case, tp, moe):
    config = make_config(case, **SHARDABLE)
    model = hf_model(config)
    spec = ModelSpec.from_config(config)
    tensors = {}
    for key, value in model.state_dict().items():  # canonical names, per-expert tensors
        name = key.replace("model.", "backbone.", 1)
        if name.endswith(("experts.up_proj", "experts.down_proj")):
            head, proj = name.rsplit(".", 1)
            for e in range(value.shape[0]):
                tensors[f"{head}.{e}.{proj}.weight"] = value[e]
        else:
            tensors[name] = value
    x = torch.randn(2, 5, spec.hidden_size)
    for layer, letter in enumerate(spec.layer_types):
        full = model.model.layers[layer].mixer
        full.config._attn_implementation = "eager"
        with torch.no_grad():
            expected = full(x)[0] if letter == "*" else full(x)
            ranks = [_rank_module(config, layer, tp, moe, tensors, r) for r in range(tp)]
            total = sum(m(x)[0] if letter == "*" else m(x) for m in ranks)  # the all-reduce
        torch.testing.assert_close(total, expected, atol=2e-5, rtol=1e-4, msg=f"layer {layer} ({letter})")


# ---- rank writer --------------------------------------------------------------------------------------------
def write_checkpoint(folder, spec: ModelSpec, tensors: dict[str, torch.Tensor], quantized: bool):
    folder.mkdir(parents=True)
    write_json(folder / "config.json", spec.to_config())
    if quantized:
        write_json(folder / "hf_quant_config.json", {"quantization": {"quant_algo": "MIXED_PRECISION"}})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("moe", ["ep", "tp"])
def test_rank_files_hold_exactly_the_shards(tmp_path, moe):
    spec = spec_of("mtp")
    tensors = make_tensors(spec, "nvfp4")
    source = write_checkpoint(tmp_path / "ckpt", spec, tensors, quantized=True)
    summary = write_ranks(source, tmp_path / "ranks", 4, moe)
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["rank0", "rank1", "rank2", "rank3"]
    for r in range(4):
        folder = tmp_path / "ranks" / f"rank{r}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "hf_quant_config.json", "model.safetensors"]
        expected = {n: p for n, t in tensors.items() if (p := shard_tensor(n, t, spec, 4, r, moe)) is not None}
        with safe_open(folder / "model.safetensors", "pt") as f:  # safetensors' own reader
            assert sorted(f.keys()) == sorted(expected)
            for name, part in expected.items():
                assert same_bits(f.get_tensor(name), part.contiguous()), name
        config = json.loads((folder / "config.json").read_text())
        assert (config["world_size"], config["tp"], config["rank"], config["moe_parallel"]) == (4, 4, r, moe)
        assert config["expert_numbering"] == "global"
        assert config["layout"] == rank_layout(spec, 4, r, moe)
        assert ModelSpec.from_config(config["model"]) == open_checkpoint(source).spec
        assert config["quantization"] == {"quantization": {"quant_algo": "MIXED_PRECISION"}}
        data = (folder / "model.safetensors").stat().st_size
        with open(folder / "model.safetensors", "rb") as fh:
            data -= 8 + int.from_bytes(fh.read(8), "little")
        assert summary["ranks"][r]["bytes"] == data == sum(p.numel() * p.element_size() for p in expected.values())


def test_writer_reads_transformers_checkpoints_and_refuses_bad_tp_before_writing(tmp_path):
    model = hf_model(make_config("latent_grouped", **SHARDABLE))
    source = save_hf_checkpoint(model, tmp_path / "hub")
    write_ranks(source, tmp_path / "ranks", 2, "ep")
    ckpt = open_checkpoint(source)
    with safe_open(tmp_path / "ranks" / "rank1" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("backbone.embeddings.weight"), ckpt.get("backbone.embeddings.weight")[48:])
    with pytest.raises(ShardError, match="valid --tp values for this model: 1, 2, 4"):
        write_ranks(source, tmp_path / "bad", 3)
    assert not (tmp_path / "bad").exists()


def test_shard_stage_writes_ranks_and_is_skipped_when_up_to_date(tmp_path):
    from nemo3.pipeline import BuildOptions, run_stages

    spec = spec_of("plain_moe")
    source = write_checkpoint(tmp_path / "ckpt", spec, make_tensors(spec, "bf16"), quantized=False)
    options = BuildOptions(output=tmp_path / "out", checkpoint=source, tp=2, moe_parallel="tp")
    logs = []
    record = run_stages(options, ["shard"], log=logs.append)
    assert record["stages"]["shard"]["tp"] == 2 and len(record["stages"]["shard"]["ranks"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["build.json", "ranks"]
    for r in range(2):
        assert (tmp_path / "out" / "ranks" / f"rank{r}" / "model.safetensors").is_file()
    run_stages(options, ["shard"], log=logs.append)
    assert logs[-1] == "[shard] up to date, skipped"
