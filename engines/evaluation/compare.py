"""What quantization costs: builds scored against a reference (the BF16 model) on held-out text.

    report = compare([Path("deploy-nvfp4"), Path("deploy-fp8")], reference=Path("deploy-bf16"))
    print(format_table(report))

Data: `sequences` windows of `seq_len` tokens of the built-in corpus's held-out split (Python
standard-library files no model was trained on; quant/data.py), encoded with the reference's
tokenizer. Every model runs the plain network (`nemo3.load`: quantized layers dequantized, with
activation and K/V fake quantization); no runtime is involved. Per build, over every next-token
position whose target is not a BOS (the document framing):

    perplexity       exp(mean cross-entropy) of the build's own next-token distribution
    kl_mean, kl_p99  KL(reference || build) per position, in nats: mean and 99th percentile
    top1_agreement   fraction of positions where the build's argmax is the reference's
    greedy_prefix    mean number of leading tokens a greedy continuation (`gen_tokens` tokens after the
                     first `prompt_len` tokens of the first `prompts` windows) shares with the reference's

The reference's rows are scored against itself (KL 0, agreement 1) so its perplexity sits in the
same table. Models are loaded one at a time; the reference's log-probabilities [sequences,
seq_len - 1, vocab] are kept in memory (float32) meanwhile.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...export.build_folder import label_of, model_folder
from ...export.tokenizer import load_tokenizer
from .greedy import greedy
from .heldout import next_token_logprobs

@dataclass(frozen=True)
class CompareOptions:
    sequences: int = 16
    seq_len: int = 128
    prompts: int = 8
    prompt_len: int = 32
    gen_tokens: int = 32
    batch_size: int = 4
    device: str = "cpu"

    def __post_init__(self):
        for key in ("sequences", "seq_len", "prompts", "prompt_len", "gen_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be >= 1")
        if self.prompts > self.sequences:
            raise ValueError(f"--prompts {self.prompts}: at most --sequences {self.sequences}")
        if self.prompt_len >= self.seq_len:
            raise ValueError(f"--prompt-len {self.prompt_len}: must be shorter than --seq-len {self.seq_len}")


@dataclass(frozen=True)
class Accuracy:
    label: str
    path: str
    perplexity: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    greedy_prefix: float  # tokens, out of gen_tokens
    positions: int


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading tokens of a [P, n] and b [P, n] are equal: [P]."""
    return (a == b).long().cumprod(dim=1).sum(dim=1)


def score(label: str, path: str, logprobs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor,
          keep: torch.Tensor, continuation: torch.Tensor, reference_continuation: torch.Tensor) -> Accuracy:
    """Accuracy of `logprobs` [n, T-1, V] against the reference's, on the positions `keep` [n, T-1]."""
    nll = -logprobs.gather(-1, targets[..., None]).squeeze(-1)[keep].double()
    kl = (reference.exp() * (reference - logprobs)).sum(-1)[keep].double().clamp(min=0)
    top1 = (logprobs.argmax(-1) == reference.argmax(-1))[keep]
    bad = int((~torch.isfinite(nll) | torch.isnan(logprobs[keep]).any(-1)).sum())
    if bad:  # NaN rows agree with NaN rows: no number of this build can be reported
        raise ValueError(f"{path}: NaN or inf log-probabilities at {bad} of {int(keep.sum())} held-out positions; "
                         "its weights overflow (no accuracy is reported for it)")
    return Accuracy(label=label, path=path, perplexity=math.exp(float(nll.mean())), kl_mean=float(kl.mean()),
                    kl_p99=float(torch.quantile(kl, 0.99)), top1_agreement=float(top1.float().mean()),
                    greedy_prefix=float(common_prefix(continuation, reference_continuation).float().mean()),
                    positions=int(keep.sum()))


def compare(builds: list[str | Path], reference: str | Path, options: CompareOptions = CompareOptions(),
            log=print) -> dict:
    """Score every build against `reference` (build or checkpoint folders); see the module docstring."""
    from ..network.loading import load
    from ...quant.data import heldout_windows

    ref_folder = model_folder(reference)
    log(f"reference: {ref_folder}")
    ref_model = load(ref_folder, device=options.device)
    spec = ref_model.spec
    windows = heldout_windows(load_tokenizer(ref_folder), spec, options.sequences, options.seq_len)
    if windows.shape[0] < options.prompts:
        raise ValueError(f"the held-out text gives only {windows.shape[0]} windows of {options.seq_len} tokens, "
                         f"fewer than --prompts {options.prompts}")
    targets = windows[:, 1:]
    keep = targets != spec.bos_token_id if spec.bos_token_id is not None else torch.ones_like(targets, dtype=torch.bool)
    prompts = windows[:options.prompts, :options.prompt_len]
    ref_logprobs = next_token_logprobs(ref_model, windows, options.batch_size)
    ref_continuation = greedy(ref_model, prompts, options.gen_tokens)
    del ref_model
    rows = [score(f"reference ({Path(reference).name})", str(reference), ref_logprobs, ref_logprobs, targets, keep,
                  ref_continuation, ref_continuation)]
    for build in builds:
        folder = model_folder(build)
        log(f"build: {folder}")
        model = load(folder, device=options.device)
        if model.spec.vocab_size != spec.vocab_size:
            raise ValueError(f"{folder}: vocab_size {model.spec.vocab_size} differs from the reference's "
                             f"{spec.vocab_size}; compare builds of the same model")
        rows.append(score(f"{label_of(build)} ({Path(build).name})", str(build), next_token_logprobs(model, windows, options.batch_size),
                          ref_logprobs, targets, keep, greedy(model, prompts, options.gen_tokens), ref_continuation))
        del model
    return {"options": dataclasses.asdict(options),
            "heldout": {"windows": windows.shape[0], "seq_len": options.seq_len, "positions": int(keep.sum())},
            "reference": dataclasses.asdict(rows[0]), "builds": [dataclasses.asdict(r) for r in rows[1:]]}


THROUGHPUT = ("output_tokens_per_s", "ttft_p50_ms", "tpot_ms", "weight_mb", "executor")


def add_throughput(report: dict, bench: dict) -> dict:
    """The comparison with each row's serving figures from `bench` (engines/benchmark.py's run_benchmark over
    the reference then the builds, in that order): output tok/s and its ratio to the reference's, TTFT p50,
    TPOT, resident weight MiB, how decode steps ran."""
    rows = [report["reference"], *report["builds"]]
    served = bench["results"][:len(rows)]
    if len(served) != len(rows):
        raise ValueError(f"the benchmark has {len(served)} results for {len(rows)} compared models")
    for row, result in zip(rows, served):
        row.update({key: result[key] for key in THROUGHPUT})
        row["tokens_per_s_vs_reference"] = round(result["output_tokens_per_s"] / served[0]["output_tokens_per_s"], 3)
    report["throughput"] = {"workload": bench["workload"], "device": bench["device"]}
    return report


def format_table(report: dict) -> str:
    """The comparison as a Markdown table (readable on a terminal too), with the serving figures when measured."""
    gen = report["options"]["gen_tokens"]
    ref_ppl = report["reference"]["perplexity"]
    served = "throughput" in report
    lines = ["| build | perplexity | vs reference | KL mean | KL p99 | top-1 agreement | greedy prefix |"
             + (" output tok/s | vs reference | TTFT p50 ms | TPOT ms | weights MiB |" if served else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" * 5 if served else "")]
    for row in [report["reference"], *report["builds"]]:
        change = f"{100 * (row['perplexity'] / ref_ppl - 1):+.2f}%"
        line = (f"| {row['label']} | {row['perplexity']:.4f} | {change} | {row['kl_mean']:.5f} | "
                f"{row['kl_p99']:.5f} | {100 * row['top1_agreement']:.2f}% | {row['greedy_prefix']:.1f}/{gen} |")
        if served:
            line += (f" {row['output_tokens_per_s']:.1f} ({row['executor']}) | {row['tokens_per_s_vs_reference']:.2f}x"
                     f" | {row['ttft_p50_ms']} | {row['tpot_ms']} | {row['weight_mb']} |")
        lines.append(line)
    held = report["heldout"]
    lines.append("")
    lines.append(f"{held['windows']} held-out windows of {held['seq_len']} tokens ({held['positions']:,} scored "
                 f"positions); KL(reference || build) in nats; greedy prefix: leading tokens shared with the "
                 f"reference's greedy continuation of {report['options']['prompts']} prompts of "
                 f"{report['options']['prompt_len']} tokens.")
    if served:
        w = report["throughput"]["workload"]
        lines.append(f"Serving: {w['num_prompts']} prompts of {w['input_len']} tokens, {w['output_len']} output tokens "
                     f"each, concurrency {w['concurrency']}, on {report['throughput']['device']} (nemo3 bench).")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One figure: each model's output tokens/s against its KL to the reference (up and left is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [report["reference"], *report["builds"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        ax.scatter(row["kl_mean"], row["output_tokens_per_s"], color="#76b900", s=50)
        ax.annotate(f" {row['label']}\n top-1 {100 * row['top1_agreement']:.1f}%, "
                    f"{row['tokens_per_s_vs_reference']:.2f}x", (row["kl_mean"], row["output_tokens_per_s"]),
                    fontsize=8)
    ax.set_xlabel("KL(reference || build), nats per token")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"throughput vs accuracy ({report['throughput']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
