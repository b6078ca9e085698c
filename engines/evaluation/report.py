"""The build's accuracy report (OUT/report/): the built checkpoint against the unquantized input checkpoint.

accuracy.json and accuracy.md (engines/evaluation/compare.py with its default options); the numbers also go
into build.json. A checkpoint without tokenizer.json gets a note instead (the held-out text cannot be encoded).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .compare import CompareOptions, compare, format_table


def write_report(built: Path, reference: Path, recipe_name: str, out: Path,
                 options: CompareOptions = CompareOptions()) -> dict:
    """Score the checkpoint `built` against `reference` into the folder `out`; returns the summary for build.json."""
    if not (reference / "tokenizer.json").is_file():
        note = f"not measured: {reference} has no tokenizer.json to encode the held-out text with"
        (out / "accuracy.md").write_text(f"# Accuracy of this build ({recipe_name})\n\n{note}\n")
        return {"accuracy": None, "note": note}
    import torch

    if options.device == "cpu" and torch.cuda.is_available():
        options = dataclasses.replace(options, device="cuda")
    report = compare([built], reference, options, log=lambda _: None)
    row = report["builds"][0]
    row["label"] = f"{recipe_name} (this build)"
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "accuracy.md").write_text(
        f"# Accuracy of this build ({recipe_name}) against the unquantized input checkpoint\n\n"
        f"{format_table(report)}\n")
    return {"accuracy": {"perplexity": row["perplexity"], "reference_perplexity": report["reference"]["perplexity"],
                         "kl_mean": row["kl_mean"], "kl_p99": row["kl_p99"], "top1_agreement": row["top1_agreement"],
                         "greedy_prefix": row["greedy_prefix"], "gen_tokens": options.gen_tokens}}
