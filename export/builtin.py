"""The built-in tiny Nemotron 3 model shipped as package data (see export/builtin/README.md)."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_model_path() -> Path:
    """Folder of the built-in model: config.json, model.safetensors, tokenizer files, model card."""
    if not (BUILTIN_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"{BUILTIN_DIR}: the built-in model's weights are missing "
                                "(see export/builtin/README.md: `python -m nemo3.engines.training`)")
    return BUILTIN_DIR


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint a command should use: the given folder, or the built-in model."""
    return Path(path) if path is not None else builtin_model_path()
