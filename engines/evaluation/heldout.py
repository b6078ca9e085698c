"""Held-out evaluation on the Python standard library (export/corpus.py): what `nemo3 eval-ppl` prints.

The held-out files are encoded with the checkpoint's own tokenizer and framed [BOS] file [EOS]
(ids from its config), joined into one stream and cut into windows of `window` tokens that overlap
by one token, so every token after the first is predicted exactly once, with up to window-1
tokens of context from its own window. Predicting a BOS (the framing after an EOS) is not scored.

- loss: mean cross-entropy (nats/token) of the lm_head's next-token logits; perplexity exp(loss);
  bits per byte: total nats / ln 2 / UTF-8 bytes of the held-out text.
- mtp_agreement: at each position t, how often the MTP draft for token t+2 (its inputs: token t+1
  and the backbone's state at t) has the same top-1 as the main head at t+1: a one-token draft's
  greedy acceptance rate, teacher-forced.
- unigram_loss: the cross-entropy of the training split's token frequencies (add-one smoothed over
  the vocabulary) on the same held-out targets: the baseline that knows no context at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ...export import corpus
from ..network.model import Model


@dataclass(frozen=True)
class HeldoutResult:
    files: int
    bytes: int
    tokens: int  # scored next-token targets
    window: int
    loss: float  # nats/token
    unigram_loss: float  # nats/token
    mtp_agreement: float | None  # None: the model has no MTP layers
    mtp_positions: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / math.log(2) / self.bytes

    @property
    def unigram_perplexity(self) -> float:
        return math.exp(self.unigram_loss)

    @property
    def reduction_vs_unigram(self) -> float:
        """How much lower the model's cross-entropy is than the unigram baseline's (0.45: 45% lower)."""
        return 1 - self.loss / self.unigram_loss

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "unigram_perplexity": self.unigram_perplexity, "reduction_vs_unigram": self.reduction_vs_unigram}


def window_starts(n: int, window: int) -> list[int]:
    """Starts of the windows over a stream of n tokens: stride window-1, the last window may be shorter."""
    if window < 3:
        raise ValueError(f"window={window}: must be at least 3 tokens (the MTP needs t, t+1 and t+2)")
    return list(range(0, max(n - 1, 1), window - 1))


def next_token_logits(model: Model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one held-out scorer every evaluation uses: rows [B, T] -> (final hidden states [B, T, D],
    float32 logits [B, T-1, V] of each next token)."""
    hidden = model.final_hidden(model(rows))
    return hidden, model.lm_head(hidden[:, :-1]).float()


@torch.no_grad()
def next_token_logprobs(model: Model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every window [n, T]: [n, T-1, V] float32 on the CPU."""
    return torch.cat([F.log_softmax(next_token_logits(model, batch.to(model.device))[1], dim=-1).cpu()
                      for batch in windows.split(batch_size)])


@torch.no_grad()
def score_stream(model: Model, stream: torch.Tensor, window: int, batch_size: int, skip_id: int | None
                 ) -> tuple[float, int, int, int]:
    """(sum of target nats, targets scored, MTP top-1 agreements, MTP positions) over `stream` [n]."""
    n = stream.numel()
    nats, targets, agree, positions = 0.0, 0, 0, 0
    starts = window_starts(n, window)
    for length in sorted({min(window, n - s) for s in starts}, reverse=True):
        same = [s for s in starts if min(window, n - s) == length]
        for i in range(0, len(same), batch_size):
            rows = torch.stack([stream[s:s + length] for s in same[i:i + batch_size]]).to(model.device)
            hidden, logits = next_token_logits(model, rows)
            keep = rows[:, 1:] != skip_id if skip_id is not None else torch.ones_like(rows[:, 1:], dtype=torch.bool)
            loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
            nats += float(loss[keep.flatten()].double().sum())
            targets += int(keep.sum())
            if model.mtp is not None and length >= 3:
                drafts, _ = model.mtp_draft(rows[:, 1:-1], hidden[:, :-2])
                same_top1 = drafts.argmax(-1) == logits[:, 1:].argmax(-1)
                agree += int(same_top1[keep[:, 1:]].sum())
                positions += int(keep[:, 1:].sum())
    return nats, targets, agree, positions


def unigram_cross_entropy(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `targets` of add-one smoothed token frequencies counted in `train`."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[targets].mean())


def evaluate_heldout(model: Model, tokenizer, window: int = 256, batch_size: int = 8,
                     max_files: int | None = None) -> HeldoutResult:
    """Evaluate `model` with its `tokenizers.Tokenizer` on the held-out stdlib files (all, or the first max_files)."""
    spec = model.spec
    bos = spec.bos_token_id
    eos = spec.eos_token_id[0] if isinstance(spec.eos_token_id, list) else spec.eos_token_id
    if bos is None or eos is None:
        raise ValueError("config.json: bos_token_id and eos_token_id are needed to frame the held-out files")
    files = corpus.split("heldout")[:max_files]
    if not files:
        raise ValueError("no held-out files: the Python standard library folder has no corpus files")
    stream, n_bytes = corpus.token_stream((f.text() for f in files), tokenizer, bos, eos)
    nats, targets, agree, positions = score_stream(model, stream, window, batch_size, bos)
    train, _ = corpus.token_stream(corpus.texts("train"), tokenizer, bos, eos)
    scored = stream[1:][stream[1:] != bos]
    unigram = unigram_cross_entropy(train[train != bos], scored, spec.vocab_size)
    return HeldoutResult(files=len(files), bytes=n_bytes, tokens=targets, window=window, loss=nats / targets,
                         unigram_loss=unigram, mtp_agreement=agree / positions if positions else None,
                         mtp_positions=positions)


def format_result(result: HeldoutResult) -> str:
    """The human-readable report `nemo3 eval-ppl` prints."""
    lines = [
        f"held-out: {result.files} stdlib files, {result.bytes:,} bytes, {result.tokens:,} scored tokens, "
        f"windows of {result.window} tokens",
        f"model    cross-entropy {result.loss:.4f} nats/token   perplexity {result.perplexity:.3f}   "
        f"bits/byte {result.bits_per_byte:.4f}",
        f"unigram  cross-entropy {result.unigram_loss:.4f} nats/token   perplexity {result.unigram_perplexity:.1f}"
        f"   (model {100 * result.reduction_vs_unigram:.1f}% lower)",
    ]
    if result.mtp_agreement is None:
        lines.append("MTP      none (num_nextn_predict_layers=0)")
    else:
        lines.append(f"MTP      draft top-1 = main head's top-1 one step later: {100 * result.mtp_agreement:.2f}% "
                     f"of {result.mtp_positions:,} positions")
    return "\n".join(lines)
