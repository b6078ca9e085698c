"""Token windows from text: the calibration set and the held-out set the accuracy comparison scores.

Texts are framed as the built-in model was trained (export/corpus.py `token_stream`): [BOS] text
[EOS], documents joined into one stream, encoded with the checkpoint's own tokenizer and BOS/EOS ids
from its config. The stream is cut into consecutive windows of `length` tokens; only as many
documents are encoded as the windows need.

    calibration_windows(folder, spec, None, 64, 256)     # the corpus's train split (the default)
    calibration_windows(folder, spec, "calib.jsonl", ...) # one {"text": ...} object per line
    heldout_windows(tokenizer, spec, 16, 128)            # the corpus's held-out split

A calibration file ending in `.jsonl` holds one JSON object with a string "text" per line (blank
lines skipped); any other file is one UTF-8 text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ..export import corpus
from ..export.spec import ModelSpec
from ..export.tokenizer import load_tokenizer


class DataError(ValueError):
    """Text that cannot be turned into token windows; the message names the file (and line)."""


def read_texts(path: str | Path) -> list[str]:
    """The documents of a calibration file: JSONL (`*.jsonl`) "text" fields, else the whole file as one text."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such calibration file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() != ".jsonl":
        texts = [raw]
    else:
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: expected an object with a string "text" field')
            texts.append(record["text"])
    if not any(t.strip() for t in texts):
        raise DataError(f"{path}: no text to calibrate on")
    return texts


def token_windows(texts: Iterable[str], tokenizer, spec: ModelSpec, count: int, length: int,
                  source: str) -> torch.Tensor:
    """Up to `count` consecutive windows of `length` tokens: int64 [n, length], 1 <= n <= count.

    Fewer windows when the texts run out; an error naming `source` when they do not fill one.
    """
    if count < 1 or length < 2:
        raise DataError(f"{source}: need at least 1 window of at least 2 tokens, got {count} x {length}")
    bos, eos = spec.bos_token_id, spec.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if bos is None or eos is None:
        raise DataError(f"{source}: config.json needs bos_token_id and eos_token_id to frame the texts")
    pieces, total = [], 0
    for text in texts:
        ids, _ = corpus.token_stream([text], tokenizer, bos, eos)
        pieces.append(ids)
        total += ids.numel()
        if total >= count * length:
            break
    n = min(count, total // length)
    if n == 0:
        raise DataError(f"{source}: only {total} tokens, fewer than one window of {length}")
    stream = torch.cat(pieces)
    if int(stream.max()) >= spec.vocab_size:
        raise DataError(f"{source}: the tokenizer produced id {int(stream.max())}, beyond the model's "
                        f"vocab_size={spec.vocab_size}")
    return stream[:n * length].view(n, length)


def calibration_windows(folder: str | Path, spec: ModelSpec, data: str | Path | None, samples: int,
                        seq_len: int) -> tuple[torch.Tensor, str]:
    """(windows [n, seq_len], a description of the source) for calibrating the checkpoint in `folder`."""
    if data is None:
        texts, source = corpus.texts("train"), "the built-in corpus (train split)"
    else:
        texts, source = read_texts(data), str(data)
    return token_windows(texts, load_tokenizer(folder), spec, samples, seq_len, source), source


def heldout_windows(tokenizer, spec: ModelSpec, sequences: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] windows of the built-in corpus's held-out split."""
    return token_windows(corpus.texts("heldout"), tokenizer, spec, sequences, seq_len,
                         "the built-in corpus (held-out split)")
