"""The squared-ReLU MLP of Nemotron 3: MLP layers, routed experts and the shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import SINGLE, Parallel


class ReLU2MLP(nn.Module):
    """down(relu(up(x))^2), non-gated. x [..., d_in] -> [..., d_in].

    Tensor parallel: up_proj holds the rank's intermediate channels and down_proj (row-parallel) the
    matching columns; reduce=False leaves the all-reduce to the caller (engines/parallel.py)."""

    def __init__(self, d_in: int, intermediate: int, bias: bool = False, parallel: Parallel = SINGLE):
        super().__init__()
        self.up_proj = nn.Linear(d_in, parallel.local(intermediate), bias=bias)
        self.down_proj = nn.Linear(parallel.local(intermediate), d_in, bias=bias)
        self.parallel = parallel

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        return self.parallel.row_parallel(self.down_proj, F.relu(self.up_proj(x)).square(), reduce)
