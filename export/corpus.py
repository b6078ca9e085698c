"""The built-in model's corpus: the CPython standard library's own source files.

Every machine with Python has them, so nothing is downloaded. Files are split into a training and a
held-out set by a hash of their path relative to the stdlib folder, so the same Python version gives
the same split on any machine.

Left out: test suites (`test/`, `tests/`), `idlelib/`, installed packages (`site-packages/`), the
build-specific `config-*` folder and `_sysconfigdata_*` module, and huge generated files (the codec
tables written by gencodec.py, and any file over `MAX_FILE_BYTES`, such as pydoc_data/topics.py).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    import torch

SKIPPED_FOLDERS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
MAX_FILE_BYTES = 256 * 1024
GENERATED_MARKER = "gencodec.py"  # header of the generated character-mapping codec tables
HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class SourceFile:
    relative: str  # posix path relative to the stdlib folder, e.g. "json/decoder.py"
    path: Path

    @property
    def held_out(self) -> bool:
        """Deterministic split: the first 4 bytes of sha256(relative path) modulo 100."""
        digest = hashlib.sha256(self.relative.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _keep(relative: Path, path: Path) -> bool:
    if relative.name.startswith("_sysconfigdata_") or path.stat().st_size > MAX_FILE_BYTES:
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        return GENERATED_MARKER not in f.read(1024)


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """Every corpus file under `root` (default: this Python's stdlib), sorted by relative path."""
    root = Path(root) if root is not None else stdlib_folder()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the Python standard library folder does not exist")
    files = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_FOLDERS
                         and not (here == root and d.startswith("config-"))]
        for name in names:
            path = here / name
            relative = path.relative_to(root)
            if name.endswith(".py") and path.is_file() and _keep(relative, path):
                files.append(SourceFile(relative.as_posix(), path))
    return sorted(files, key=lambda f: f.relative)


def split(part: str, root: Path | None = None) -> list[SourceFile]:
    """The files of one part of the split: "train" or "heldout"."""
    if part not in ("train", "heldout"):
        raise ValueError(f"corpus part {part!r}: expected 'train' or 'heldout'")
    return [f for f in stdlib_files(root) if f.held_out == (part == "heldout")]


def texts(part: str, root: Path | None = None) -> Iterator[str]:
    """The source text of each file of one part, in path order."""
    for f in split(part, root):
        yield f.text()


def token_stream(texts_: Iterable[str], tokenizer, bos_id: int, eos_id: int) -> tuple[torch.Tensor, int]:
    """Documents encoded and joined: [BOS] doc [EOS] [BOS] doc [EOS] ... as int64 [n], and their UTF-8 bytes.

    `tokenizer` is a `tokenizers.Tokenizer`; its own post-processor is bypassed so that any
    checkpoint's tokenizer gives the same framing (BOS/EOS ids from the model's config).
    """
    import torch

    texts_ = list(texts_)
    encodings = tokenizer.encode_batch(texts_, add_special_tokens=False)
    ids: list[int] = []
    for encoding in encodings:
        ids.append(bos_id)
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64), sum(len(t.encode("utf-8")) for t in texts_)
