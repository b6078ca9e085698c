"""Checkpoints and calibrated models shared by test_quant_export.py and test_compare.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import add_missing_tensors, copy_builtin_tokenizer, hf_model, make_config, save_hf_checkpoint

from nemo3.export.builtin import BUILTIN_DIR

# every Nemotron 3 layer kind, LatentMoE, MTP; widths NVFP4 blocks divide, so every recipe applies;
# the built-in tokenizer's vocabulary, so the corpus can be encoded; dt floored at time_step_min as
# transformers' torch path does
TINY = make_config("mtp", moe_shared_expert_intermediate_size=32, vocab_size=4096,
                   time_step_limit=(0.001, math.inf))
BUILTIN_WEIGHTS = BUILTIN_DIR / "model.safetensors"
needs_builtin = pytest.mark.skipif(not BUILTIN_WEIGHTS.exists(),
                                   reason=f"{BUILTIN_WEIGHTS} is absent (the built-in model is not trained yet)")


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """save_pretrained of a random tiny model, plus random mtp.* tensors (transformers has none) and the
    built-in tokenizer files."""
    save_hf_checkpoint(hf_model(TINY, seed), folder)
    add_missing_tensors(folder, seed + 1)
    copy_builtin_tokenizer(folder)
    return folder


def random_windows(vocab_size: int, count: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))
