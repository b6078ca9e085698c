"""One layer of the network: `h = h + mixer(RMSNorm(h))`, the mixer chosen by the layer's letter."""

from __future__ import annotations

import torch
from torch import nn

from ...export.spec import ATTENTION, MAMBA, MLP, MOE, ModelSpec
from .attention import Attention
from .mamba2 import Mamba2Mixer
from .mlp import ReLU2MLP
from .moe import MoE
from .norms import RMSNorm
from .parallel import SINGLE, Parallel
from .state import InferenceState


def make_mixer(spec: ModelSpec, letter: str, parallel: Parallel = SINGLE) -> nn.Module:
    if letter == MAMBA:
        return Mamba2Mixer(spec, parallel)
    if letter == ATTENTION:
        return Attention(spec, parallel)
    if letter == MOE:
        return MoE(spec, parallel)
    if letter == MLP:
        return ReLU2MLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, parallel)
    raise ValueError(f"unknown layer letter {letter!r} (expected M, *, E or -)")


class Block(nn.Module):
    """h [B, T, D] -> [B, T, D]. `key` names this layer's entry in an InferenceState."""

    def __init__(self, spec: ModelSpec, letter: str, key: str, parallel: Parallel = SINGLE):
        super().__init__()
        self.letter, self.key = letter, key
        self.norm = RMSNorm(spec.hidden_size, spec.layer_norm_epsilon)
        self.mixer = make_mixer(spec, letter, parallel)

    def forward(self, h: torch.Tensor, state: InferenceState | None = None, slots: torch.Tensor | None = None,
                past_lengths: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(h)
        if getattr(self.mixer, "stateful", False):
            x = self.mixer(x, None if state is None else state[self.key], slots, past_lengths, lengths)
        else:
            x = self.mixer(x)
        return h + x
