"""Byte-level BPE tokenizer of the built-in model, trained with Hugging Face `tokenizers`.

Writes `tokenizer.json` (the tokenizers model; its post-processor prepends BOS) and
`tokenizer_config.json`, which transformers' `AutoTokenizer` / `PreTrainedTokenizerFast` read.
Special tokens come first, so their ids are fixed: <pad> 0, <s> 1 (BOS), </s> 2 (EOS), <think> 3,
</think> 4 (what ModelSpec's defaults and the reasoning budget expect).

    python -m nemo3.export.tokenizer_train OUT_FOLDER [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

PAD, BOS, EOS, THINK, END_THINK = "<pad>", "<s>", "</s>", "<think>", "</think>"
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK, END_THINK)
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A `tokenizers.Tokenizer`: byte-level BPE over `texts`, BOS prepended by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not 256 + len(SPECIAL_TOKENS) < vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: must exceed the 256 byte tokens plus "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, bos_id)])
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """`tokenizer_config.json` for transformers' PreTrainedTokenizerFast."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def save_tokenizer(tokenizer, folder: str | Path, model_max_length: int = 4096) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    from . import corpus

    parser = argparse.ArgumentParser(description="Train the built-in model's BPE tokenizer on the stdlib corpus.")
    parser.add_argument("out", type=Path, help="folder for tokenizer.json and tokenizer_config.json")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(corpus.texts("train"), args.vocab_size)
    save_tokenizer(tokenizer, args.out)
    print(f"{args.out}: tokenizer.json with {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
