"""The build's "read" stage through `nemo3-build`: build.json record, skip on rerun, one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import hf_model, make_config, save_hf_checkpoint
from safetensors.torch import load_file, save_file

from nemo3.cli.build import main as build_main
from nemo3.export.inspect import parameter_counts
from nemo3.export.spec import ModelSpec


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(hf_model(make_config()), tmp_path_factory.mktemp("read") / "ckpt")


def build(checkpoint, out):
    # bf16: the read stage's tests need no calibration (these checkpoints have no tokenizer to encode text with)
    return CliRunner().invoke(build_main, ["--checkpoint", str(checkpoint), "--output", str(out),
                                           "--precision", "bf16"])


def test_read_stage_records_checkpoint(checkpoint, tmp_path):
    result = build(checkpoint, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "[read] running" in result.output
    read = json.loads((tmp_path / "out" / "build.json").read_text())["stages"]["read"]
    assert read["checkpoint"] == str(checkpoint.resolve())
    assert read["pattern"] == "ME*ME" and read["mtp_pattern"] == "" and read["tensors"] == 68
    assert read["parameters"] == parameter_counts(ModelSpec.from_file(checkpoint))
    assert len(read["fingerprint"]) == 16 and read["hash"]

    rerun = build(checkpoint, tmp_path / "out")
    assert rerun.exit_code == 0 and "[read] up to date, skipped" in rerun.output
    assert json.loads((tmp_path / "out" / "build.json").read_text())["stages"]["read"] == read


def test_changed_checkpoint_is_read_again(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    tensors = load_file(checkpoint / "model.safetensors")
    save_file(tensors, folder / "model.safetensors")
    assert build(folder, tmp_path / "out").exit_code == 0
    save_file({k: v.half() if k == "lm_head.weight" else v for k, v in tensors.items()}, folder / "model.safetensors")
    result = build(folder, tmp_path / "out")
    assert result.exit_code == 0 and "[read] running" in result.output


def test_bad_checkpoint_is_one_line_and_unrecorded(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["backbone.layers.2.mixer.q_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    result = build(folder, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[-1].startswith("Error: ") and "missing tensor backbone.layers.2.mixer.q_proj.weight" in lines[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "build.json").exists()


def test_corrupt_file_fails_before_any_stage(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:-64])
    result = build(folder, tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "model.safetensors: truncated or corrupt" in result.output
    assert not (tmp_path / "out" / "build.json").exists()

