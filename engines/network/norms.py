"""RMSNorm, and the gated, grouped RMSNorm that closes a Mamba-2 mixer.

Both normalize in float32 and multiply by the weight in the input's dtype, as transformers'
`NemotronHRMSNorm` / `Zamba2RMSNormGated` do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """y = w * x / rms(x); x [..., D] -> [..., D] in x.dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """y = w * rmsnorm_per_group(x * silu(z)): groups of `group_size` channels are normalized separately.

    x, z [..., I] -> [..., I] in x.dtype. Mamba-2 uses group_size = I / n_groups, so that one
    normalization group is exactly the channels of the heads sharing one B/C group (this is what
    makes the norm shardable over tensor-parallel ranks).
    """

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size={group_size} must divide dim={dim}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = x.float() * F.silu(z.float())
        grouped = gated.unflatten(-1, (-1, self.group_size))
        normed = rms_normalize(grouped, self.eps).flatten(-2)
        return self.weight * normed.to(x.dtype)
