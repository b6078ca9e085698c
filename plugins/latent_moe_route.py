"""LatentMoE routing: sigmoid + correction bias + group-limited top-k + renormalize + scale, fused.

For each token (row of router_logits [T, E], fp32), with E experts in n_group groups of E/n_group:

    scores  = sigmoid(logits)
    biased  = scores + correction_bias                     (used for choosing only)
    group   = sum of the 2 largest biased scores of the group (the single score for 1-expert groups)
    keep the topk_group best groups; choose the top_k best biased experts inside them
    weights = scores[chosen] / (sum + 1e-20) if norm_topk_prob, times routed_scaling_factor

Chosen experts come out by descending biased score; every tie (experts and groups) goes to the lower
index. Matches transformers' NemotronHTopkRouter / DeepseekV3TopkRouter up to that tie order.
"""

from __future__ import annotations

import torch

from .dispatch import eager_reference, use_triton

WHERE = "plugins/latent_moe_route.py"
MAX_EXPERTS = 4096


def latent_moe_route_reference(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                               routed_scaling_factor):
    """Plain-torch specification (module docstring): (weights [T, top_k] fp32, expert_ids [T, top_k] int32)."""
    T, E = router_logits.shape
    scores = router_logits.float().sigmoid()
    biased = scores + correction_bias.float()
    per_group = biased.view(T, n_group, E // n_group)
    top2 = per_group.sort(dim=-1, descending=True).values[..., :2]
    group_scores = top2[..., 0] + top2[..., 1] if top2.shape[-1] == 2 else top2[..., 0]   # [T, n_group]
    # stable sorts: among equal values the lower index comes first
    kept_groups = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
    group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=biased.device)
    group_mask.scatter_(1, kept_groups, True)
    expert_mask = group_mask.repeat_interleave(E // n_group, dim=1)
    candidates = biased.masked_fill(~expert_mask, float("-inf"))
    expert_ids = candidates.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, expert_ids.to(torch.int32)


def _check(router_logits, correction_bias, top_k, n_group, topk_group):
    if router_logits.dim() != 2:
        raise ValueError(f"{WHERE}: router_logits has shape {tuple(router_logits.shape)}, expected [tokens, experts]")
    E = router_logits.shape[1]
    if E > MAX_EXPERTS:
        raise ValueError(f"{WHERE}: router_logits has {E} experts, at most {MAX_EXPERTS} are supported")
    if tuple(correction_bias.shape) != (E,):
        raise ValueError(f"{WHERE}: correction_bias has shape {tuple(correction_bias.shape)}, expected [{E}]")
    if n_group < 1 or E % n_group:
        raise ValueError(f"{WHERE}: n_group={n_group} must divide the {E} experts")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"{WHERE}: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"{WHERE}: top_k={top_k} must be in [1, {topk_group * (E // n_group)}] "
                         f"(the experts of topk_group={topk_group} groups)")


@torch.library.custom_op("nemo3::latent_moe_route", mutates_args=())
def _latent_moe_route_op(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, n_group: int,
                         topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
                         impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(impl, router_logits.device, WHERE):
        from .latent_moe_route_triton import launch
        return launch(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                      routed_scaling_factor)
    return latent_moe_route_reference(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                                      routed_scaling_factor)


@_latent_moe_route_op.register_fake
def _(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, impl):
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32),
            router_logits.new_empty(T, top_k, dtype=torch.int32))


def latent_moe_route(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                     routed_scaling_factor, *, impl=None):
    """Routing (module docstring) through the `nemo3::latent_moe_route` op.

    router_logits [T, E] fp32; correction_bias [E]. Returns (weights [T, top_k] fp32, expert_ids [T, top_k] int32).
    `impl`: "auto" | "triton" | "reference" (default: $NEMO3_KERNEL_IMPL or "auto", see plugins/dispatch.py).
    """
    _check(router_logits, correction_bias, top_k, n_group, topk_group)
    if eager_reference(impl, router_logits.device, WHERE):
        return latent_moe_route_reference(router_logits, correction_bias, int(top_k), int(n_group), int(topk_group),
                                          bool(norm_topk_prob), float(routed_scaling_factor))
    return _latent_moe_route_op(router_logits, correction_bias, int(top_k), int(n_group), int(topk_group),
                                bool(norm_topk_prob), float(routed_scaling_factor), impl or "")
