"""The one greedy decoder of the evaluation tools: one prefill, then one decode step per token.

It runs the network directly (no runtime): the accuracy comparison decodes a batch of prompts with it,
`nemo3 run --tp N` decodes one prompt on every rank (the all-gathered logits, hence their argmax, are the
same on every rank, so every rank feeds the same token to the next step), and `greedy_text` is the
built-in model card's sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..network.model import Model


@torch.inference_mode()
def greedy_steps(model: Model, prompts: torch.Tensor, max_tokens: int) -> Iterator[torch.Tensor]:
    """Yield the argmax tokens [P] of each step after prompts [P, T] (all of one length), up to `max_tokens`."""
    count, length = prompts.shape
    if length == 0:
        raise ValueError("greedy decoding: the prompt is empty")
    device = model.device
    state = model.new_state(max_sequences=count, max_length=length + max_tokens, mtp=False)
    slots = torch.arange(count, device=device)
    ids, past = prompts.to(device), torch.zeros(count, dtype=torch.long, device=device)
    for _ in range(max_tokens):
        hidden = model(ids, state, slots, past)[:, -1]
        tokens = model.lm_head(model.final_hidden(hidden)).argmax(-1)
        yield tokens
        past = past + ids.shape[1]
        ids = tokens[:, None]


def greedy(model: Model, prompts: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy continuations [P, tokens] of prompts [P, T]."""
    return torch.stack(list(greedy_steps(model, prompts, tokens)), dim=1).cpu()


def greedy_tokens(model: Model, prompt: list[int], max_tokens: int,
                  stop_ids: set[int] | frozenset[int] = frozenset()) -> Iterator[int]:
    """Yield up to `max_tokens` tokens after one prompt, stopping after one of `stop_ids`."""
    for tokens in greedy_steps(model, torch.tensor([prompt], dtype=torch.long), max_tokens):
        token = int(tokens[0])
        yield token
        if token in stop_ids:
            return


def greedy_text(model: Model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` (BOS-prefixed) as text, up to EOS."""
    ids = [model.spec.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False).ids
    eos = model.spec.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for token in greedy_tokens(model, ids, max_new_tokens, eos):
        if token in eos:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=False)
