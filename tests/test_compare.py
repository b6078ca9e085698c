"""The accuracy comparison (engines/evaluation/compare.py, `nemo3 compare`) and the build with its quantize and report stages."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from quant_fixtures import BUILTIN_DIR, needs_builtin, random_windows, write_tiny_checkpoint

import nemo3
from nemo3.cli.build import main as build_main
from nemo3.cli.main import main as nemo3_main
from nemo3.engines.network.quant_linear import QuantLinear
from nemo3.export.checkpoint import open_checkpoint
from nemo3.quant.calibrate import calibrate
from nemo3.engines.evaluation.compare import CompareOptions, common_prefix, compare, format_table, score
from nemo3.quant.data import calibration_windows
from nemo3.quant.export import export_quantized, export_unquantized
from nemo3.quant.recipes import load_recipe

pytest.importorskip("modelopt.torch.quantization")

SMALL = ["--sequences", "4", "--seq-len", "64", "--prompts", "2", "--prompt-len", "16", "--gen-tokens", "8"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def build_checkpoint(source_folder, recipe_name: str, out, windows: torch.Tensor | None = None):
    """OUT/checkpoint as the quantize stage writes it, for one recipe."""
    source = open_checkpoint(source_folder)
    out.mkdir(parents=True)
    recipe = load_recipe(recipe_name)
    if recipe_name == "bf16":
        export_unquantized(source, out)
    else:
        windows = random_windows(source.spec.vocab_size) if windows is None else windows
        export_quantized(calibrate(source_folder, recipe, windows, progress=False), source, out,
                         {"recipe": recipe.to_dict()})
    return out


def test_scores_by_hand():
    g = torch.Generator().manual_seed(0)
    reference = F.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    build = F.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 4] = False
    ref_cont, cont = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]])
    row = score("b", "p", build, reference, targets, keep, cont, ref_cont)
    nll = -build.gather(-1, targets[..., None]).squeeze(-1)[keep]
    kl = torch.stack([F.kl_div(build[i, t], reference[i, t], log_target=True, reduction="sum")
                      for i in range(2) for t in range(5) if keep[i, t]])
    assert math.isclose(row.perplexity, math.exp(nll.mean().item()), rel_tol=1e-6)
    assert math.isclose(row.kl_mean, kl.mean().item(), rel_tol=1e-5)
    assert math.isclose(row.kl_p99, torch.quantile(kl.double(), 0.99).item(), rel_tol=1e-5)
    assert row.top1_agreement == (build.argmax(-1) == reference.argmax(-1))[keep].float().mean().item()
    assert row.greedy_prefix == 3.0 and row.positions == 9  # prefixes 2 and 4
    assert common_prefix(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 2], [3, 4]])).tolist() == [0, 2]
    same = score("r", "p", reference, reference, targets, keep, ref_cont, ref_cont)
    assert same.kl_mean == 0 and same.top1_agreement == 1 and same.greedy_prefix == 4
    broken = reference.clone()
    broken[0, 2] = float("nan")  # what an overflowing (or NaN) weight gives: NaN rows "agree" with NaN rows
    for build_logprobs, ref_logprobs in ((broken, broken), (broken, reference)):
        with pytest.raises(ValueError, match=r"^p: NaN or inf log-probabilities at 1 of 9 held-out positions"):
            score("b", "p", build_logprobs, ref_logprobs, targets, keep, cont, ref_cont)


def test_compare_cli(tiny_folder, tmp_path):
    """The reference scores perfectly against itself; BF16 rounding costs little, NVFP4 everywhere much more."""
    bf16 = build_checkpoint(tiny_folder, "bf16", tmp_path / "bf16")
    nvfp4_all = build_checkpoint(tiny_folder, "nvfp4-all", tmp_path / "nvfp4-all")
    result = CliRunner().invoke(nemo3_main, ["compare", str(bf16), str(nvfp4_all), "--reference",
                                             str(tiny_folder), "--json", str(tmp_path / "r.json"), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    ref, (low, high) = report["reference"], report["builds"]
    assert ref["kl_mean"] == 0 and ref["top1_agreement"] == 1 and ref["greedy_prefix"] == 8
    assert low["label"] == "bf16 (bf16)" and high["label"] == "nvfp4-all (nvfp4-all)"
    assert 0 < low["kl_mean"] < high["kl_mean"] and low["top1_agreement"] > high["top1_agreement"]
    assert report["heldout"] == {"windows": 4, "seq_len": 64, "positions": ref["positions"]}
    assert "| bf16 (bf16) |" in result.output and "KL(reference || build)" in result.output


def test_compare_errors(tiny_folder, tmp_path):
    result = CliRunner().invoke(nemo3_main, ["compare", str(tiny_folder), "--reference", str(tiny_folder),
                                             "--prompts", "9", "--sequences", "4"])
    assert result.exit_code == 1 and "Error: --prompts 9: at most --sequences 4" in result.output
    result = CliRunner().invoke(nemo3_main, ["compare", str(tiny_folder), "--reference", str(tmp_path)])
    assert result.exit_code == 1 and "config.json" in result.output and "Traceback" not in result.output


def test_build_end_to_end_and_rerun(tiny_folder, tmp_path):
    out = tmp_path / "deploy"
    args = ["--checkpoint", str(tiny_folder), "--precision", "nvfp4", "--output", str(out), "--calib-samples", "4",
            "--calib-seq-len", "32"]
    first = CliRunner().invoke(build_main, args)
    assert first.exit_code == 0, first.output
    record = json.loads((out / "build.json").read_text())
    stages = list(record["stages"])
    assert stages[:2] == ["read", "quantize"] and stages[-1] == "report"
    quantize, accuracy = record["stages"]["quantize"], record["stages"]["report"]["accuracy"]
    assert quantize["recipe"] == "nvfp4" and quantize["calibration"]["samples"] == 4
    assert quantize["quant_algo"] == "MIXED_PRECISION" and quantize["mtp_tensors"] > 0
    assert 0 < accuracy["kl_mean"] and 0 < accuracy["top1_agreement"] < 1
    assert (out / "report" / "accuracy.md").read_text().count("| nvfp4 (this build) |") == 1
    assert json.loads((out / "report" / "accuracy.json").read_text())["builds"][0]["kl_mean"] == accuracy["kl_mean"]
    assert any(isinstance(m, QuantLinear) for m in nemo3.load(out / "checkpoint").modules())
    assert not list(out.glob(".tmp-*"))

    again = CliRunner().invoke(build_main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date, skipped") == len(stages), again.output
    assert json.loads((out / "build.json").read_text())["stages"] == record["stages"]

    other = CliRunner().invoke(build_main, [*args[:-1], "48"])  # other calibration: quantize and report redone
    assert other.exit_code == 0, other.output
    assert "[read] up to date, skipped" in other.output
    assert "[quantize] running" in other.output and "[report] running" in other.output


def test_bf16_build_and_bad_calibration_file(tiny_folder, tmp_path):
    result = CliRunner().invoke(build_main, ["--checkpoint", str(tiny_folder), "--precision", "bf16", "--no-engines",
                                             "--output", str(tmp_path / "bf16")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bf16" / "build.json").read_text())
    assert record["stages"]["quantize"]["quant_algo"] is None
    assert not (tmp_path / "bf16" / "checkpoint" / "hf_quant_config.json").exists()
    assert record["stages"]["report"]["accuracy"]["top1_agreement"] > 0.95
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "x = 1"}\n{"text": 3}\n')
    result = CliRunner().invoke(build_main, ["--checkpoint", str(tiny_folder), "--output", str(tmp_path / "bad"),
                                             "--calib-data", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f'Error: {bad}:2: expected an object with a string "text" field'


# ---- the five recipes on the built-in model ------------------------------------------------------------
@needs_builtin
def test_five_recipes_on_the_builtin_model(tmp_path):
    """python -m pytest tests/test_compare.py -k five -s prints the table."""
    spec = open_checkpoint(BUILTIN_DIR).spec
    windows, _ = calibration_windows(BUILTIN_DIR, spec, None, samples=8, seq_len=128)
    builds = [build_checkpoint(BUILTIN_DIR, name, tmp_path / name, windows)
              for name in ("nvfp4", "nvfp4-conservative", "fp8", "bf16", "nvfp4-all")]
    report = compare(builds, BUILTIN_DIR, CompareOptions(sequences=16, seq_len=128), log=lambda _: None)
    print("\n" + format_table(report))
    rows = {b["label"].split()[0]: b for b in report["builds"]}
    assert min(rows, key=lambda name: rows[name]["kl_mean"]) == "bf16"
    assert rows["fp8"]["kl_mean"] < 0.01 and rows["fp8"]["top1_agreement"] > 0.93  # FP8 close to BF16
    assert rows["nvfp4"]["kl_mean"] < 0.5 * rows["nvfp4-all"]["kl_mean"]  # the recipe buys accuracy
    assert rows["nvfp4"]["top1_agreement"] > rows["nvfp4-all"]["top1_agreement"]
