"""The Nemotron 3 network: embeddings, the hybrid layer stack, norm_f, an untied lm_head, and MTP.

    h      = embeddings(ids)
    h      = h + mixer_i(norm_i(h))      for each layer i (Mamba-2, attention, MoE or MLP)
    c      = norm_f(h)                   the "final hidden state" the lm_head and the MTP read
    logits = lm_head(c)

The module tree's state dict uses the canonical (hub) tensor names of export/names.py, so a
checkpoint loads with `load_state_dict(..., strict=True)`. Every call either runs stateless over
whole sequences, or continues each row's sequence from a slot of an InferenceState (engines/state.py):
prefill chunks and decode steps share the same pools.

Built with a sharded `Parallel` context (engines/parallel.py), the same modules are one
tensor-parallel rank's network: they hold the rank's part of each tensor (export/sharding.py) and
their outputs (hidden states, logits) are the whole model's, identical on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ...export.kv_pages import DEFAULT_PAGE_SIZE
from ...export.sharding import check_tp
from ...export.spec import ModelSpec
from .block import Block
from .mtp import MTP
from .norms import RMSNorm
from .parallel import SINGLE, Parallel, VocabEmbedding, VocabHead
from .state import InferenceState


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        self.embeddings = VocabEmbedding(spec.vocab_size, spec.hidden_size, parallel)
        self.layers = nn.ModuleList(Block(spec, letter, f"backbone.layers.{i}", parallel)
                                    for i, letter in enumerate(spec.layer_types))
        self.norm_f = RMSNorm(spec.hidden_size, spec.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, state: InferenceState | None = None,
                slots: torch.Tensor | None = None, past_lengths: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, state, slots, past_lengths, lengths)
        return h


class Model(nn.Module):
    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        if parallel.sharded:  # a one-line error naming the tensor that does not split, and the valid --tp
            check_tp(spec, parallel.world_size, parallel.moe)
        self.spec, self.parallel = spec, parallel
        self.backbone = Backbone(spec, parallel)
        self.lm_head = VocabHead(spec.hidden_size, spec.vocab_size, parallel)
        self.mtp = MTP(spec, parallel) if spec.num_nextn_predict_layers else None

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embedding is never quantized; a quantized lm_head stores packed bytes)."""
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_parameters(self) -> int:
        """Elements of every checkpoint tensor (MTP included)."""
        return sum(t.numel() for t in self.state_dict().values())

    def new_state(self, max_sequences: int, max_length: int, mtp: bool = True, num_pages: int | None = None,
                  page_size: int = DEFAULT_PAGE_SIZE) -> InferenceState:
        """Empty state pools in the model's dtype and device (MTP layers' pools too, if `mtp` and present);
        a rank's pools hold its heads and channels only. K and V in `num_pages` pages (engines/network/state.py),
        FP8 in the attention layers whose k_proj carries a k_scale (an FP8 KV cache recipe)."""
        return InferenceState(self.spec, max_sequences, max_length, self.dtype, self.device, mtp=mtp,
                              parallel=self.parallel, num_pages=num_pages, page_size=page_size,
                              fp8_kv=self.fp8_kv_layers())

    def fp8_kv_layers(self) -> frozenset[str]:
        """State keys of the attention layers whose K/V a recipe quantized to FP8 (k_proj carries a k_scale)."""
        return frozenset(block.key for block in self.modules() if isinstance(block, Block)
                         and hasattr(getattr(block.mixer, "k_proj", None), "k_scale"))

    # ---- backbone ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: InferenceState | None = None,
                slots: torch.Tensor | None = None, past_lengths: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> hidden states h [B, T, D] before norm_f.

        With `state`, `slots` [B] and `past_lengths` [B]: row b continues the sequence stored in slot
        slots[b], which has past_lengths[b] tokens so far (0: a new sequence); slot < 0 is a padding
        row. T is the same for every row: a prefill chunk, a decode step (T=1) or a verify (T=k+1).
        `lengths` [B] (a prefill chunk, T > MAX_STEP_TOKENS of engines/network/mamba2.py): row b's real tokens,
        right-padded to T; its state is left as after its last real token (the padding's outputs are garbage).
        """
        if not torch.compiler.is_compiling():  # (reads the batch back: no host syncs in a compiled step)
            check_batch(input_ids, state, slots, past_lengths)
            if state is not None:
                state.reset_fresh(slots, past_lengths)
        return self.backbone(input_ids, state, slots, past_lengths, lengths)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """norm_f(h): what the lm_head reads, and what MTP consumes as c_t."""
        return self.backbone.norm_f(h)

    def logits(self, input_ids: torch.Tensor, state: InferenceState | None = None,
               slots: torch.Tensor | None = None, past_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> next-token logits [B, T, V] float32 (same state arguments as forward)."""
        return self.lm_head(self.final_hidden(self(input_ids, state, slots, past_lengths))).float()

    # ---- MTP ---------------------------------------------------------------------------------------
    def mtp_draft(self, next_tokens: torch.Tensor, hidden: torch.Tensor, state: InferenceState | None = None,
                  slots: torch.Tensor | None = None, past_lengths: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP step over T positions of the MTP sequence (the runtime's form).

        next_tokens [B, T]: x_{t+1}, the token after each position t; hidden [B, T, D]: c_t (see
        engines/mtp.py). Returns (logits for x_{t+2} [B, T, V] float32, c' [B, T, D]). With a state,
        row b continues its MTP sequence at position past_lengths[b] in slot slots[b]: the MTP layers
        keep their own pools. Typical use after the backbone produced h for prompt x_0..x_{n-1} and
        sampled x_n: mtp_draft(x_1..x_n, final_hidden(h)) with past 0 drafts y_0 from the last row
        position; then mtp_draft(y_0, c'_last) with past n drafts y_1, and so on.
        """
        if self.mtp is None:
            raise ValueError("mtp_draft: this model has no MTP layers (num_nextn_predict_layers=0)")
        if not torch.compiler.is_compiling():
            check_batch(next_tokens, state, slots, past_lengths)
            if state is not None:  # (the MTP sequence's own positions: the backbone's state is not touched)
                state.reset_fresh(slots, past_lengths, prefix="mtp.")
        if hidden.shape[:2] != next_tokens.shape:
            raise ValueError(f"mtp_draft: hidden {tuple(hidden.shape)} does not match next_tokens "
                             f"{tuple(next_tokens.shape)}")
        out = self.mtp(self.backbone.embeddings(next_tokens), hidden, state, slots, past_lengths)
        return self.lm_head(out).float(), out

    def mtp_sequence_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """MTP logits at every position at once (the training form): [B, T-1, V], position t predicting
        input_ids[t+2] from input_ids[t+1] and the backbone's c_t."""
        hidden = self.final_hidden(self(input_ids))
        return self.mtp_draft(input_ids[:, 1:], hidden[:, :-1])[0]

    def mtp_logits(self, input_ids: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy recursive drafts of the k tokens after input_ids [B, T] (T >= 2): [B, k, V] float32.

        input_ids is a prompt plus the token the backbone chose after it (x_0..x_n); draft i
        predicts x_{n+1+i}. Draft 0 is the MTP step at the last position; draft i > 0 extends the
        MTP sequence by one position whose inputs are the argmax of draft i-1 and its c'. Stateless:
        every draft recomputes the whole MTP sequence, which makes this the reference for
        drafting step by step with a state.
        """
        tokens = input_ids[:, 1:]
        hidden = self.final_hidden(self(input_ids))[:, :-1]
        drafts = []
        for _ in range(k):
            logits, out = self.mtp_draft(tokens, hidden)
            drafts.append(logits[:, -1])
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
            hidden = torch.cat([hidden, out[:, -1:]], dim=1)
        return torch.stack(drafts, dim=1)


def check_batch(input_ids: torch.Tensor, state: InferenceState | None, slots: torch.Tensor | None,
                past_lengths: torch.Tensor | None) -> None:
    """One-line errors for malformed forward arguments."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if state is None:
        if slots is not None or past_lengths is not None:
            raise ValueError("slots/past_lengths given without a state")
        return
    B = input_ids.shape[0]
    for name, t in (("slots", slots), ("past_lengths", past_lengths)):
        if t is None or t.shape != (B,) or t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape [{B}] when a state is given, got "
                             f"{None if t is None else (tuple(t.shape), t.dtype)}")
    if int(past_lengths.max()) + input_ids.shape[1] > state.max_length:
        raise ValueError(f"past_lengths up to {int(past_lengths.max())} + {input_ids.shape[1]} new tokens exceed "
                         f"the state's max_length={state.max_length}")
    if int(slots.max()) >= state.max_sequences:
        raise ValueError(f"slots up to {int(slots.max())} exceed the state's max_sequences={state.max_sequences}")
    if int(past_lengths.min()) < 0:
        raise ValueError(f"past_lengths must be >= 0, got {past_lengths.tolist()}")
