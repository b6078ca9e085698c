"""Text in and out of the runtime: the checkpoint's tokenizer, special tokens, and streaming
detokenization that never emits half a character or the beginning of a stop string."""

from __future__ import annotations

import json
from pathlib import Path

from ...export.spec import ModelSpec
from ...export.tokenizer import load_tokenizer

THINK_START, THINK_END = "<think>", "</think>"


class TextCodec:
    """Encode/decode with the checkpoint's `tokenizer.json` (HF tokenizers); token ids only without one."""

    def __init__(self, tokenizer, spec: ModelSpec, add_bos: bool = False):
        self.tokenizer, self.spec, self.add_bos = tokenizer, spec, add_bos
        eos = spec.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.think_start = self._special(THINK_START)
        self.think_end = self._special(THINK_END)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, spec: ModelSpec) -> "TextCodec":
        folder = Path(folder)
        tokenizer = load_tokenizer(folder, required=False)
        if tokenizer is None:
            return cls(None, spec)
        config = folder / "tokenizer_config.json"
        add_bos = bool(json.loads(config.read_text()).get("add_bos_token", False)) if config.exists() else False
        return cls(tokenizer, spec, add_bos)

    def _special(self, token: str) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.spec.bos_token_id
        return ([bos] if self.add_bos and bos is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)

    def thinking_after(self, ids: list[int]) -> bool:
        """Whether a sequence ending with `ids` is inside a <think> section."""
        if self.think_start is None:
            return False
        last_start = max((i for i, t in enumerate(ids) if t == self.think_start), default=-1)
        last_end = max((i for i, t in enumerate(ids) if t == self.think_end), default=-1)
        return last_start > last_end


class Detokenizer:
    """Incremental text of one request's output tokens.

    `push` returns the text that is final: it holds back a trailing incomplete UTF-8 character
    (decoded as U+FFFD) and any tail that could still become a stop string. With `min_tokens`, stop
    strings are looked for only after the text of the first `min_tokens` tokens, which is never cut.
    """

    def __init__(self, codec: TextCodec, stops: tuple[str, ...] = (), min_tokens: int = 0):
        self.codec, self.stops, self.min_tokens = codec, tuple(s for s in stops if s), min_tokens
        self.ids: list[int] = []
        self.sent = 0  # characters already returned
        self.stops_from = 0 if min_tokens == 0 else None  # where a stop string may start; None: not yet known

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Add tokens; return (new final text, whether a stop string was reached)."""
        self.ids.extend(ids)
        text = self.codec.decode(self.ids)
        if self.stops_from is None and len(self.ids) >= self.min_tokens:
            self.stops_from = self._complete(self.codec.decode(self.ids[:self.min_tokens]), 0)
        if self.stops_from is None:
            return self._take(text, self._complete(text, self.sent)), False
        floor = max(self.sent, self.stops_from)
        hits = [i for i in (text.find(s, max(self.stops_from, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            return self._take(text, min(hits)), True
        end = self._complete(text, floor)
        for stop in self.stops:  # hold back a suffix that is a prefix of a stop string
            for n in range(min(len(stop) - 1, end - floor), 0, -1):
                if text[end - n:end] == stop[:n]:
                    end -= n
                    break
        return self._take(text, end), False

    @staticmethod
    def _complete(text: str, floor: int) -> int:
        """Where `text` ends without a trailing incomplete character (not before `floor`)."""
        end = len(text)
        while end > floor and text[end - 1] == "\ufffd":
            end -= 1
        return end

    def flush(self) -> str:
        return self._take(self.codec.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        out, self.sent = text[self.sent:end], end
        return out
