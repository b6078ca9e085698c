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


def format_table(report: dict) -> str:
    """The comparison as a Markdown table (readable on a terminal too)."""
    gen = report["options"]["gen_tokens"]
    ref_ppl = report["reference"]["perplexity"]
    lines = ["| build | perplexity | vs reference | KL mean | KL p99 | top-1 agreement | greedy prefix |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in [report["reference"], *report["builds"]]:
        change = f"{100 * (row['perplexity'] / ref_ppl - 1):+.2f}%"
        lines.append(f"| {row['label']} | {row['perplexity']:.4f} | {change} | {row['kl_mean']:.5f} | "
                     f"{row['kl_p99']:.5f} | {100 * row['top1_agreement']:.2f}% | "
                     f"{row['greedy_prefix']:.1f}/{gen} |")
    held = report["heldout"]
    lines.append("")
    lines.append(f"{held['windows']} held-out windows of {held['seq_len']} tokens ({held['positions']:,} scored "
                 f"positions); KL(reference || build) in nats; greedy prefix: leading tokens shared with the "
                 f"reference's greedy continuation of {report['options']['prompts']} prompts of "
                 f"{report['options']['prompt_len']} tokens.")
    return "\n".join(lines)
