"""export/checkpoint.py: both naming schemes, shards, MTP, and a one-line error for every kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import hf_model, make_config, save_hf_checkpoint, write_json
from safetensors.torch import load_file, save_file

from nemo3.export.checkpoint import CheckpointError, canonical_name, open_checkpoint
from nemo3.export.names import expected_tensors


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(transformers model, its save_pretrained folder: hub names, per-expert tensors)."""
    model = hf_model(make_config())
    return model, save_hf_checkpoint(model, tmp_path_factory.mktemp("plain") / "hub")


@pytest.fixture(scope="module")
def hub_tensors(plain):
    return load_file(plain[1] / "model.safetensors")


def write_checkpoint(folder: Path, tensors: dict, config_from: Path) -> Path:
    """A checkpoint folder with `config_from`'s config.json and `tensors` in one model.safetensors."""
    folder.mkdir(parents=True)
    shutil.copy(config_from / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def expect_error(folder, *culprits, validate=False):
    """Opening (and validating) `folder` fails with a one-line message naming every culprit."""
    with pytest.raises(CheckpointError) as info:
        ckpt = open_checkpoint(folder)
        if validate:
            ckpt.validate()
    message = str(info.value)
    assert "\n" not in message
    for culprit in culprits:
        assert str(culprit) in message, message
    return message


# ---- naming schemes -------------------------------------------------------------------------------------
def test_hub_checkpoint_holds_transformers_tensors(plain):
    model, folder = plain
    ckpt = open_checkpoint(folder)
    ckpt.validate()
    assert ckpt.names() == list(expected_tensors(ckpt.spec))  # all consumed, in model order
    assert "backbone.embeddings.weight" in ckpt and "backbone.embedding.weight" not in ckpt
    checked = 0
    for key, value in model.state_dict().items():  # transformers' in-memory names: model.*, fused experts
        name = canonical_name(key)
        if "{e}" in name:
            for e in range(value.shape[0]):
                assert torch.equal(ckpt.get(name.format(e=e)), value[e])
                checked += 1
        else:
            assert torch.equal(ckpt.get(name), value), key
            checked += 1
    assert checked == len(ckpt.names())
    where = ckpt.source_name("backbone.embeddings.weight")
    assert where == f"{folder / 'model.safetensors'}: backbone.embedding.weight"


def test_transformers5_naming_gives_identical_tensors(plain, tmp_path):
    model, hub = plain
    t5 = write_checkpoint(tmp_path / "t5", model.state_dict(), hub)  # model.*, model.embeddings, fused [E, out, in]
    assert "model.layers.1.mixer.experts.up_proj" in load_file(t5 / "model.safetensors")
    a, b = open_checkpoint(hub), open_checkpoint(t5)
    b.validate()
    assert a.spec == b.spec and a.names() == b.names()
    for name in a.names():
        assert a.shape(name) == b.shape(name) and a.dtype(name) == b.dtype(name)
        assert torch.equal(a.get(name), b.get(name)), name
    up = "backbone.layers.1.mixer.experts.3.up_proj.weight"
    assert b.shape(up) == (16, 32) and b.shape(up.replace("up_proj", "down_proj")) == (32, 16)
    assert b.source_name(up).endswith("model.layers.1.mixer.experts.up_proj[3]")
    assert b.get(up, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sharded_checkpoint(plain, tmp_path):
    model, hub = plain
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = open_checkpoint(hub), open_checkpoint(tmp_path / "sharded")
    b.validate()
    assert a.names() == b.names()
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    assert len({b.source_name(n).split(":")[0] for n in b.names()}) > 1


@pytest.mark.parametrize("stored, canonical", [
    ("backbone.embedding.weight", "backbone.embeddings.weight"),
    ("backbone.embeddings.weight", "backbone.embeddings.weight"),
    ("model.embeddings.weight", "backbone.embeddings.weight"),
    ("model.layers.4.mixer.experts.down_proj", "backbone.layers.4.mixer.experts.{e}.down_proj.weight"),
    ("backbone.layers.4.mixer.experts.7.up_proj.weight", "backbone.layers.4.mixer.experts.7.up_proj.weight"),
    ("mtp.layers.1.mixer.experts.up_proj", "mtp.layers.1.mixer.experts.{e}.up_proj.weight"),
    ("model.mtp.layers.0.eh_proj.weight", "mtp.layers.0.eh_proj.weight"),
    ("backbone.mtp.layers.0.enorm.weight", "mtp.layers.0.enorm.weight"),
    ("language_model.backbone.norm_f.weight", "backbone.norm_f.weight"),
    ("model.language_model.layers.0.mixer.A_log", "backbone.layers.0.mixer.A_log"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_canonical_name(stored, canonical):
    assert canonical_name(stored) == canonical


def test_mtp_checkpoint_reads_mtp_tensors(tmp_path):
    model = hf_model(make_config("mtp"))
    folder = save_hf_checkpoint(model, tmp_path / "mtp")
    spec = open_checkpoint(folder).spec
    expected = expected_tensors(spec)
    torch.manual_seed(1)
    mtp = {name: torch.randn(shape) for name, shape in expected.items() if name.startswith("mtp.")}
    assert any(".mixer.experts.7." in n for n in mtp) and "mtp.layers.1.final_layernorm.weight" in mtp
    tensors = load_file(folder / "model.safetensors")  # transformers dropped MTP: add it, hub names
    save_file({**tensors, **mtp}, folder / "model.safetensors")
    ckpt = open_checkpoint(folder)
    ckpt.validate()
    assert ckpt.names() == list(expected)
    assert all(torch.equal(ckpt.get(name), value) for name, value in mtp.items())


def test_vision_language_checkpoint(plain, hub_tensors, tmp_path):
    tensors = {f"language_model.{k}": v for k, v in hub_tensors.items()}
    tensors["vision_model.patch_embed.weight"] = torch.zeros(4, 4)
    folder = write_checkpoint(tmp_path / "vl", tensors, plain[1])
    text = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", {"model_type": "nemotron_h_vl", "text_config": text})
    ckpt = open_checkpoint(folder)
    ckpt.validate()
    assert ckpt.spec == open_checkpoint(plain[1]).spec
    assert ckpt.skipped == ["vision_model.patch_embed.weight"]


# ---- checks against the config --------------------------------------------------------------------------
def test_missing_tensor(plain, hub_tensors, tmp_path):
    tensors = {k: v for k, v in hub_tensors.items() if k != "backbone.layers.3.mixer.D"}
    expect_error(write_checkpoint(tmp_path / "c", tensors, plain[1]), "missing tensor backbone.layers.3.mixer.D",
                 tmp_path / "c", validate=True)


def test_unexpected_tensor(plain, hub_tensors, tmp_path):
    tensors = {**hub_tensors, "backbone.layers.0.mixer.extra.weight": torch.zeros(2)}
    expect_error(write_checkpoint(tmp_path / "c", tensors, plain[1]), "unexpected tensor",
                 "backbone.layers.0.mixer.extra.weight", tmp_path / "c" / "model.safetensors", validate=True)


def test_expert_count_differs_from_config(plain, tmp_path):
    model, hub = plain
    tensors = dict(model.state_dict())
    tensors["model.layers.4.mixer.experts.up_proj"] = tensors["model.layers.4.mixer.experts.up_proj"][:7]
    expect_error(write_checkpoint(tmp_path / "c", tensors, hub),
                 "missing tensor backbone.layers.4.mixer.experts.7.up_proj.weight", validate=True)


def test_wrong_shape(plain, hub_tensors, tmp_path):
    tensors = {**hub_tensors, "backbone.layers.2.mixer.k_proj.weight": torch.zeros(8, 32)}
    expect_error(write_checkpoint(tmp_path / "c", tensors, plain[1]), "backbone.layers.2.mixer.k_proj.weight",
                 "[8, 32]", "[16, 32]", tmp_path / "c" / "model.safetensors", validate=True)


def test_integer_dtype(plain, hub_tensors, tmp_path):
    tensors = {**hub_tensors, "lm_head.weight": torch.zeros(96, 32, dtype=torch.int32)}
    expect_error(write_checkpoint(tmp_path / "c", tensors, plain[1]), "lm_head.weight", "I32", "floating-point",
                 validate=True)


def test_same_tensor_twice(plain, hub_tensors, tmp_path):
    tensors = {**hub_tensors, "backbone.embeddings.weight": hub_tensors["backbone.embedding.weight"].clone()}
    expect_error(write_checkpoint(tmp_path / "c", tensors, plain[1]), "backbone.embedding.weight",
                 "backbone.embeddings.weight")


def test_fused_experts_must_be_3d(plain, tmp_path):
    tensors = dict(plain[0].state_dict())
    tensors["model.layers.1.mixer.experts.up_proj"] = tensors["model.layers.1.mixer.experts.up_proj"].flatten(0, 1)
    expect_error(write_checkpoint(tmp_path / "c", tensors, plain[1]), "model.layers.1.mixer.experts.up_proj",
                 "3 dimensions")


def test_quantization_companions_need_hf_quant_config(plain, hub_tensors, tmp_path):
    scale = "backbone.layers.0.mixer.in_proj.weight_scale"
    folder = write_checkpoint(tmp_path / "c", {**hub_tensors, scale: torch.ones(100, 2)}, plain[1])
    expect_error(folder, scale, "hf_quant_config.json", validate=True)
    write_json(folder / "hf_quant_config.json", {"quantization": {"quant_algo": "NVFP4"}})
    ckpt = open_checkpoint(folder)
    ckpt.validate()
    names = ckpt.names()
    assert names.index(scale) == names.index("backbone.layers.0.mixer.in_proj.weight") + 1


# ---- broken files ---------------------------------------------------------------------------------------
def corrupt_copy(plain, tmp_path, change):
    folder = tmp_path / "c"
    shutil.copytree(plain[1], folder)
    file = folder / "model.safetensors"
    file.write_bytes(change(file.read_bytes()))
    return folder, file


def test_truncated_data(plain, tmp_path):
    folder, file = corrupt_copy(plain, tmp_path, lambda b: b[:-100])
    expect_error(folder, file, "truncated or corrupt", "data_offsets")


def test_header_length_beyond_file(plain, tmp_path):
    folder, file = corrupt_copy(plain, tmp_path, lambda b: (10**9).to_bytes(8, "little") + b[8:])
    expect_error(folder, file, "header of 1000000000 bytes")


def test_header_not_json(plain, tmp_path):
    def garble(b):
        n = int.from_bytes(b[:8], "little")
        return b[:8] + b"#" * n + b[8 + n:]

    folder, file = corrupt_copy(plain, tmp_path, garble)
    expect_error(folder, file, "not valid JSON")


def test_file_shorter_than_header_length(plain, tmp_path):
    folder, file = corrupt_copy(plain, tmp_path, lambda b: b[:5])
    expect_error(folder, file, "truncated or corrupt")


def test_index_names_missing_shard(plain, tmp_path):
    plain[0].save_pretrained(tmp_path / "c", max_shard_size="40KB")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    (tmp_path / "c" / shard).unlink()
    expect_error(tmp_path / "c", "model.safetensors.index.json", shard, "does not exist")


def test_index_names_tensor_absent_from_shard(plain, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(plain[1], folder)
    names = list(load_file(folder / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names} | {"backbone.layers.0.mixer.ghost": "model.safetensors"}
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    expect_error(folder, "model.safetensors.index.json", "backbone.layers.0.mixer.ghost", "does not hold it")


def test_no_config(plain, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(plain[1], folder)
    (folder / "config.json").unlink()
    expect_error(folder, folder, "no config.json")


def test_no_weights(plain, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(plain[1] / "config.json", folder)
    expect_error(folder, folder, "no weights")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickled_checkpoint_is_refused(plain, tmp_path, name):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(plain[1] / "config.json", folder)
    (folder / name).write_bytes(b"\x80\x04not a pickle to be opened")
    expect_error(folder, folder / name, "convert", "safetensors")


def test_unknown_name(plain):
    with pytest.raises(CheckpointError, match="backbone.layers.99.norm.weight"):
        open_checkpoint(plain[1]).get("backbone.layers.99.norm.weight")


# ---- fingerprint, tokenizer files ------------------------------------------------------------------------
def test_fingerprint(plain, hub_tensors, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(plain[1], folder)
    first = open_checkpoint(folder).fingerprint()
    assert first == open_checkpoint(folder).fingerprint() and len(first) == 16
    config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", {**config, "routed_scaling_factor": 1.5})
    second = open_checkpoint(folder).fingerprint()
    assert second != first
    half_head = torch.zeros(96, 32, dtype=torch.bfloat16)
    save_file({**hub_tensors, "lm_head.weight": half_head}, folder / "model.safetensors")
    assert open_checkpoint(folder).fingerprint() != second


def test_tokenizer_files(plain, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(plain[1], folder)
    assert open_checkpoint(folder).tokenizer_files() == []
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text("{}")
    assert [p.name for p in open_checkpoint(folder).tokenizer_files()] == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
