"""The (Latent)MoE mixer: sigmoid router with group-limited top-k, squared-ReLU experts, shared expert.

    weights, ids = route(W_g h)                       # fp32, plugins/latent_moe_route.py
    routed      = fc2_latent_proj(sum_k weights_k * expert_{ids_k}(fc1_latent_proj(h)))
    out         = routed + shared_experts(h)

LatentMoE (`moe_latent_size`) runs the routed experts in a smaller latent space; the router and the
shared expert always see the full hidden state. Without a latent size the projections are absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..export.spec import ModelSpec
from ..plugins.latent_moe_route import latent_moe_route
from .mlp import ReLU2MLP


class Router(nn.Module):
    """Router weight [E, D] and the fp32 correction bias [E] that steers the choice only.

    Sigmoid scores, group-limited top-k on scores + bias, weights = the chosen unbiased scores
    (renormalized if norm_topk_prob) times routed_scaling_factor: the `latent_moe_route` op.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.n_routed_experts, spec.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(spec.n_routed_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = spec.num_experts_per_tok, spec.n_group, spec.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = spec.norm_topk_prob, spec.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
        logits = F.linear(x.float(), self.weight.float())
        return latent_moe_route(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)


class MoE(nn.Module):
    """x [B, T, D] -> [B, T, D]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        D, De = spec.hidden_size, spec.expert_dim
        self.gate = Router(spec)
        self.experts = nn.ModuleList(ReLU2MLP(De, spec.moe_intermediate_size, spec.mlp_bias)
                                     for _ in range(spec.n_routed_experts))
        if spec.moe_shared_expert_intermediate_size:
            self.shared_experts = ReLU2MLP(D, spec.moe_shared_expert_intermediate_size, spec.mlp_bias)
        if spec.moe_latent_size:
            self.fc1_latent_proj = nn.Linear(D, spec.moe_latent_size, bias=spec.mlp_bias)
            self.fc2_latent_proj = nn.Linear(spec.moe_latent_size, D, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(0, -2)  # [T, D]
        weights, ids = self.gate(tokens)
        latent = self.fc1_latent_proj(tokens) if hasattr(self, "fc1_latent_proj") else tokens
        routed = self.run_experts(latent, weights, ids)
        if hasattr(self, "fc2_latent_proj"):
            routed = self.fc2_latent_proj(routed)
        if hasattr(self, "shared_experts"):
            routed = routed + self.shared_experts(tokens)
        return routed.view_as(x)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), accumulated in fp32. x [T, De] -> [T, De]."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            token, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[e](x[token]).float() * weights[token, slot, None])
        return out.to(x.dtype)
