"""The one tokenizer loader: a checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(folder: str | Path, required: bool = True):
    """`folder/tokenizer.json` as a `tokenizers.Tokenizer`; without one, None or (required) a one-line error."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: no tokenizer.json; this needs the checkpoint's tokenizer")
        return None
    return Tokenizer.from_file(str(path))
