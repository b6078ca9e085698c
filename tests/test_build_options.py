"""`nemo3-build` refuses bad options and bad weights in one line, before any stage runs where it can: --tp
against the model, --precision against --recipe, an unwritable --output, NaN/inf weights (found while the
build reads them anyway); a rerun removes what an interrupted run left."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import hf_model, make_config, save_hf_checkpoint
from quant_fixtures import write_tiny_checkpoint
from safetensors.torch import load_file, save_file

from nemo3.cli.build import main as build_main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """No tokenizer: a bf16 build of it needs no calibration and its report is a note (fast)."""
    return save_hf_checkpoint(hf_model(make_config()), tmp_path_factory.mktemp("opts") / "ckpt")


def build(checkpoint, out, *args):
    return CliRunner().invoke(build_main, ["--checkpoint", str(checkpoint), "--output", str(out), "--no-engines",
                                           *args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize("args,fragment", [
    (["--tp", "3"], "--tp 3: "),
    (["--tp", "2", "--moe-parallel", "tp", "--precision", "bf16"], None),  # valid: builds
    (["--precision", "bf16", "--recipe", "nvfp4"], "--precision bf16 conflicts with --recipe nvfp4, which builds nvfp4"),
    (["--precision", "nvfp4", "--recipe", "fp8"], "--precision nvfp4 conflicts with --recipe fp8, which builds fp8"),
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["--calib-samples", "0"], "--calib-samples 0: must be >= 1"),
    (["--calib-seq-len", "1"], "--calib-seq-len 1: must be >= 2"),
], ids=["tp3", "tp2-valid", "bf16-vs-nvfp4", "nvfp4-vs-fp8", "unknown-recipe", "calib-samples", "calib-seq-len"])
def test_options_are_checked_before_any_stage_runs(checkpoint, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = build(checkpoint, out, *args)
    if fragment is None:
        assert result.exit_code == 0, result.output
        return
    assert_one_line_error(result, fragment)
    assert "running" not in result.output and not out.exists()


def test_a_recipe_alone_sets_the_precision_and_says_so(checkpoint, tmp_path):
    result = build(checkpoint, tmp_path / "out", "--recipe", "bf16")
    assert result.exit_code == 0, result.output
    assert "--recipe bf16 implies --precision bf16" in result.output
    assert json.loads((tmp_path / "out" / "build.json").read_text())["options"]["precision"] == "bf16"


def test_unwritable_output_is_one_line(checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(build(checkpoint, blocker / "out", "--precision", "bf16"),
                          f"--output {blocker / 'out'}: cannot write there (")
    if os.geteuid() == 0:
        return  # root writes into read-only folders
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(build(checkpoint, locked, "--precision", "bf16"), f"--output {locked}: cannot write there (")


def test_a_rerun_removes_what_an_interrupted_run_left(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert build(checkpoint, out, "--precision", "bf16").exit_code == 0
    (out / ".tmp-checkpoint").mkdir()  # what a build killed during quantization leaves
    (out / ".tmp-checkpoint" / "model.safetensors.tmp").write_bytes(b"half")
    rerun = build(checkpoint, out, "--precision", "bf16")
    assert rerun.exit_code == 0 and "[quantize] up to date, skipped" in rerun.output
    assert not list(out.glob(".tmp-*"))


def with_bad_value(source, folder, name: str, value: float):
    folder.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def assert_last_line_error(result, *fragments):
    """A build that ran stages before the error: its progress lines, then the one-line error, no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and all(fragment in last for fragment in fragments), last


def test_nan_weight_stops_a_bf16_build_naming_the_tensor(checkpoint, tmp_path):
    name = "backbone.layers.1.mixer.experts.3.up_proj.weight"
    folder = with_bad_value(checkpoint, tmp_path / "ckpt", name, float("nan"))
    result = build(folder, tmp_path / "out", "--precision", "bf16")
    assert_last_line_error(result, f"{folder / 'model.safetensors'}: {name}: 1 NaN/inf value(s)")


def test_inf_weight_stops_an_nvfp4_build_naming_the_tensor(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "tiny")
    name = "backbone.layers.0.mixer.in_proj.weight"
    folder = with_bad_value(source, tmp_path / "ckpt", name, float("inf"))
    result = build(folder, tmp_path / "out", "--calib-samples", "2", "--calib-seq-len", "16")
    assert_last_line_error(result, f"{folder}: {name}: 1 NaN/inf value(s)")
    assert torch.isinf(load_file(folder / "model.safetensors")[name]).sum() == 1
