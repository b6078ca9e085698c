"""The (Latent)MoE mixer: sigmoid router with group-limited top-k, squared-ReLU experts, shared expert.

    weights, ids = route(W_g h)                       # fp32, plugins/latent_moe_route.py
    routed      = fc2_latent_proj(sum_k weights_k * expert_{ids_k}(fc1_latent_proj(h)))
    out         = routed + shared_experts(h)

LatentMoE (`moe_latent_size`) runs the routed experts in a smaller latent space; the router and the
shared expert always see the full hidden state. Without a latent size the projections are absent.

Tensor parallel: the router and the latent projections are replicated; every rank routes every token
(global expert ids). With --moe-parallel ep a rank holds whole experts (`experts.{e}` keeps the global
e) and adds the contributions of its own; with tp it holds a slice of every expert. Each rank's
routed sum (after fc2_latent_proj, which is linear) and its shared-expert slice are partial sums of
the output: one all-reduce per layer adds them up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...export.spec import ModelSpec
from ...plugins.dispatch import functional_mode
from ...plugins.latent_moe_route import latent_moe_route
from .mlp import ReLU2MLP
from .parallel import SINGLE, Parallel


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


GATHER_MAX_PAIRS = 16  # (token, expert) pairs up to which experts run as one gathered batched matmul


class MoE(nn.Module):
    """x [B, T, D] -> [B, T, D]."""

    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        D, De = spec.hidden_size, spec.expert_dim
        self.parallel = parallel
        self.gate = Router(spec)
        self.experts = nn.ModuleDict({str(e): ReLU2MLP(De, spec.moe_intermediate_size, spec.mlp_bias,
                                                       parallel.expert_parallel)
                                      for e in parallel.experts(spec.n_routed_experts)})
        if spec.moe_shared_expert_intermediate_size:
            self.shared_experts = ReLU2MLP(D, spec.moe_shared_expert_intermediate_size, spec.mlp_bias, parallel)
        if spec.moe_latent_size:
            self.fc1_latent_proj = nn.Linear(D, spec.moe_latent_size, bias=spec.mlp_bias)
            self.fc2_latent_proj = nn.Linear(spec.moe_latent_size, D, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(0, -2)  # [T, D]
        weights, ids = self.gate(tokens)
        latent = self.fc1_latent_proj(tokens) if hasattr(self, "fc1_latent_proj") else tokens
        out = self.run_experts(latent, weights, ids)
        if hasattr(self, "fc2_latent_proj"):
            out = self.parallel.row_parallel(self.fc2_latent_proj, out, reduce=False)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(tokens, reduce=False)
        return self.parallel.all_reduce(out).view_as(x)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the experts held, accumulated in fp32.
        x [T, De] -> [T, De]; a rank's part of the sum when sharded."""
        if self.stacked is not None and (ids.numel() <= GATHER_MAX_PAIRS or torch.compiler.is_compiling()):
            if ids.numel() > len(self.experts):  # more pairs than experts: read each expert once instead
                return self.run_experts_dense(x, weights, ids)
            return self.run_experts_gathered(x, weights, ids)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if functional_mode():  # an ONNX export of unstacked (quantized) experts: static shapes, every expert runs
            for e, expert in self.experts.items():  # (in the loop's order below; unrouted tokens add zeros)
                out += expert(x, reduce=False).float() * (weights * (ids == int(e))).sum(-1, keepdim=True)
            return out.to(x.dtype)
        for e in ids.unique().tolist():
            if str(e) not in self.experts:
                continue
            token, slot = (ids == e).nonzero(as_tuple=True)
            y = self.experts[str(e)](x[token], reduce=False)
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out.to(x.dtype)

    stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (up [E, I, De], down [E, De, I]) once stacked

    def stack_experts(self) -> None:
        """Hold the experts' weights as one [E, I, De] and one [E, De, I] tensor, each expert's parameters
        becoming views of them (names and state dict unchanged), so that a few tokens gather their experts
        with one index (decode; every compiled step) instead of looping over experts. Only when every expert
        is held as a plain bias-free nn.Linear (not quantized, not expert-sharded); call it after the
        weights are in place (engines/loading.py does)."""
        experts = list(self.experts.values())
        if len(experts) != self.gate.weight.shape[0] or not all(
                type(layer) is nn.Linear and layer.bias is None for e in experts for layer in (e.up_proj, e.down_proj)):
            return
        stacks = []
        for name in ("up_proj", "down_proj"):
            stack = torch.stack([getattr(e, name).weight.detach() for e in experts])
            for e, view in zip(experts, stack):
                getattr(e, name).weight = nn.Parameter(view, requires_grad=False)
            stacks.append(stack)
        self.stacked = tuple(stacks)

    def run_experts_gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum for a few tokens: each (token, choice) pair gathers its expert's weights and one
        batched matmul replaces the loop over experts, whose per-expert overhead dominates small batches."""
        T, k = ids.shape
        up, down = self.stacked
        chosen = ids.flatten().long()
        h = F.relu(torch.bmm(up[chosen], x.repeat_interleave(k, dim=0)[:, :, None])).square()  # [T*k, I, 1]
        y = torch.bmm(down[chosen], h).squeeze(-1).float() * weights.reshape(-1, 1)
        return y.view(T, k, -1).sum(1).to(x.dtype)

    def run_experts_dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum with every expert applied to every token, weighted 0 where not chosen (static shapes):
        with more (token, choice) pairs than experts, this reads each expert's weights once where gathering
        would copy them once per pair."""
        up, down = self.stacked
        dense = torch.zeros(ids.shape[0], up.shape[0], dtype=torch.float32, device=x.device)
        dense.scatter_(1, ids.long(), weights.float())  # [T, E]
        h = F.relu(torch.einsum("td,eid->tei", x, up)).square()
        y = torch.einsum("tei,edi->ted", h, down).float() * dense[..., None]
        return y.sum(1).to(x.dtype)
