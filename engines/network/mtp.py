"""Multi-token prediction (MTP): the draft head of Nemotron 3 Super.

One MTP step predicts the token after next. At position t, with x_{t+1} the token after t:

    g  = hnorm(c_t)                    c_t: the hidden state the lm_head read at position t
    e  = enorm(embed(x_{t+1}))         the shared embedding table
    h  = eh_proj(cat[e, g])            embedding first, then hidden state
    h  = blocks of the MTP pattern     each h + mixer(norm(h)); causal over the MTP's own positions
    c' = final_layernorm(h)            logits for x_{t+2} = lm_head(c'), the shared lm_head

For a backbone position c_t = norm_f(h_t), the backbone's final (normalized) hidden state; for a
drafted position c_t is the c' of the MTP step that drafted it. Drafting k tokens applies the one
MTP step recursively: each draft's token (greedy) and c' are the next step's inputs.

This is how NVIDIA trains and serves these weights (the design notes said "before norm_f"; every
upstream feeds the normalized state):
- NVIDIA/Megatron-LM, megatron/core/transformer/multi_token_prediction.py: `_concat_embeddings`
  concatenates (enorm(embedding), hnorm(hidden)) before `eh_proj`; `_postprocess` applies
  `final_layernorm`; `MultiTokenPredictionBlock.forward` hands each depth's normalized output to
  the next depth, and `compute_mtp_single_step` (speculative decoding) feeds it back the same way.
  megatron/core/models/hybrid/hybrid_block.py applies `final_norm` to the decoder output that
  megatron/core/models/hybrid/hybrid_model.py passes to the MTP block.
- vllm-project/vllm, vllm/model_executor/models/nemotron_h_mtp.py: cat([enorm(embeds),
  hnorm(hidden)]), `final_layernorm` on the step's last layer; vllm/model_executor/models/nemotron_h.py
  returns `norm_f(...)` as the target hidden states the proposer hands to the MTP model.
- NVIDIA/TensorRT-LLM, tensorrt_llm/_torch/models/modeling_nemotron_h.py (`NemotronHMTPDecoderLayer`,
  same order and norms) and tensorrt_llm/_torch/speculative/mtp.py (`MTPEagleWorker`: the single
  MTP module applied recursively, its output hidden state and argmax draft fed back).
"""

from __future__ import annotations

import torch
from torch import nn

from ...export.names import mtp_layer_count
from ...export.spec import ModelSpec
from .block import Block
from .norms import RMSNorm
from .parallel import SINGLE, Parallel
from .state import InferenceState


class MTPLayer(Block):
    """A block of an MTP step; the step's first layer also fuses embedding and hidden state, its last
    layer also holds the final norm (names as in the hub checkpoints: mtp.layers.{j}.enorm, ...)."""

    def __init__(self, spec: ModelSpec, letter: str, key: str, first: bool, last: bool,
                 parallel: Parallel = SINGLE):
        super().__init__(spec, letter, key, parallel)
        D, eps = spec.hidden_size, spec.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(D, eps)
            self.hnorm = RMSNorm(D, eps)
            self.eh_proj = nn.Linear(2 * D, D, bias=False)
        if last:
            self.final_layernorm = RMSNorm(D, eps)


class MTP(nn.Module):
    """The MTP layers: num_nextn_predict_layers steps of len(mtp pattern) layers each."""

    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        pattern = spec.mtp_layer_types
        self.steps = spec.num_nextn_predict_layers
        self.layers = nn.ModuleList(
            MTPLayer(spec, pattern[j % len(pattern)], f"mtp.layers.{j}", first=j % len(pattern) == 0,
                     last=j % len(pattern) == len(pattern) - 1, parallel=parallel)
            for j in range(mtp_layer_count(spec)))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, state: InferenceState | None = None,
                slots: torch.Tensor | None = None, past_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, T, D] (of x_{t+1}), hidden [B, T, D] (c_t) -> c' [B, T, D], the lm_head input for x_{t+2}.

        With a state, row b continues its MTP sequence at position past_lengths[b] (the MTP layers'
        own KV cache / Mamba state)."""
        if self.steps != 1:
            raise NotImplementedError(f"MTP: drafting uses one MTP step (num_nextn_predict_layers=1, as Nemotron 3 "
                                      f"Super and vLLM/TensorRT-LLM); this model has {self.steps}")
        first, last = self.layers[0], self.layers[-1]
        h = first.eh_proj(torch.cat([first.enorm(embeds), first.hnorm(hidden)], dim=-1))
        for layer in self.layers:
            h = layer(h, state, slots, past_lengths)
        return last.final_layernorm(h)
