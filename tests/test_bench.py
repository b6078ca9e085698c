"""`nemo3 bench` on the built-in model: every row measured, ratios to BF16 and to transformers, files written."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nemo3.cli.main import main as cli


def test_bench_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, ["bench", "--mtp", "0", "--mtp", "2", "--num-prompts", "4", "--input-len", "16",
                                      "--output-len", "6", "--concurrency", "2", "--rounds", "2", "--eager", "-o",
                                      str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    names = [row["name"] for row in report["results"]]
    assert names == ["bf16", "bf16 mtp2", "transformers generate() batch 2", "transformers generate() batch 1"]
    for row in report["results"]:  # the builds' figures over both rounds; transformers runs once
        assert row["output_tokens"] == (1 if row["executor"] == "generate()" else 2) * 4 * 6
        assert row["output_tokens_per_s"] > 0
    assert [row["executor"] for row in report["results"]] == ["eager", "eager", "generate()", "generate()"]
    assert report["results"][0]["vs_bf16"] == 1.0 and report["results"][2]["vs_transformers"] == 1.0
    assert report["results"][1]["acceptance_length"] > 1
    assert (out / "bench.md").read_text().startswith("| name |") and (out / "bench.png").stat().st_size > 1000
