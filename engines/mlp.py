"""The squared-ReLU MLP of Nemotron 3: MLP layers, routed experts and the shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReLU2MLP(nn.Module):
    """down(relu(up(x))^2), non-gated. x [..., d_in] -> [..., d_in]."""

    def __init__(self, d_in: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(d_in, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, d_in, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())
