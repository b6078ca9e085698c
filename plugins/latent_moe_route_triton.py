"""Triton kernel for plugins/latent_moe_route.py (imported only when the kernel runs: needs triton).

One program per token. The row of E experts is held as a [groups, experts per group] tile; groups and
experts are picked by repeated arg-max (largest value, lowest index among equals: one reduction over
keys that pack both), which gives the descending order and the tie rule of the reference. The chosen
experts' weights are gathered from the logits afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2


@triton.jit
def _order_key(values, index):
    """int64 keys whose order is (value ascending, index descending): one max-reduction finds the largest
    value and, among equal values, the lowest index. Index < 2**31; values not NaN."""
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)   # float order as signed-integer order
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _index_of(key):
    return 0x7FFFFFFF - key.to(tl.int32)   # the low 32 bits


@triton.jit
def _latent_moe_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    group_size, n_group, topk_group, top_k, scale,
    s_l_t, s_l_e, s_bias, s_w_t, s_w_k, s_id_t, s_id_k,
    NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_GS)
    expert = offs_g[:, None] * group_size + offs_j[None, :]               # [BLOCK_G, BLOCK_GS]
    real = (offs_g < n_group)[:, None] & (offs_j < group_size)[None, :]
    gone = -0x7FFFFFFFFFFFFFFF                                              # below every real key

    logits_row = logits_ptr + token * s_l_t
    logits = tl.load(logits_row + expert * s_l_e, mask=real, other=0.0).to(tl.float32)
    biased = tl.sigmoid(logits) + tl.load(bias_ptr + expert * s_bias, mask=real, other=0.0).to(tl.float32)
    biased = tl.where(real, biased, float("-inf"))

    # group score: the two largest biased scores of the group (one if the group has one expert)
    best = tl.max(biased, axis=1)
    first = tl.min(tl.where(biased == best[:, None], offs_j[None, :], BLOCK_GS), axis=1)
    second = tl.max(tl.where(offs_j[None, :] == first[:, None], float("-inf"), biased), axis=1)
    if group_size > 1:
        group_score = best + second
    else:
        group_score = best
    group_keys = tl.where(offs_g < n_group, _order_key(group_score, offs_g), gone)
    kept = offs_g < 0
    for _ in range(topk_group):
        pick = _index_of(tl.max(group_keys, axis=0))
        kept = kept | (offs_g == pick)
        group_keys = tl.where(offs_g == pick, gone, group_keys)

    keys = tl.where(kept[:, None] & real, _order_key(biased, expert), gone)
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int32)
    for i in range(top_k):
        pick = _index_of(tl.max(tl.max(keys, axis=1), axis=0))
        ids = tl.where(offs_k == i, pick, ids)
        keys = tl.where(expert == pick, gone, keys)

    in_k = offs_k < top_k
    weights = tl.sigmoid(tl.load(logits_row + ids * s_l_e, mask=in_k, other=0.0).to(tl.float32))
    weights = tl.where(in_k, weights, 0.0)
    if NORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scale
    tl.store(weights_ptr + token * s_w_t + offs_k * s_w_k, weights, mask=in_k)
    tl.store(ids_ptr + token * s_id_t + offs_k * s_id_k, ids, mask=in_k)


def prepare(router_logits, correction_bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """((weights, ids), grid, kernel args, kernel meta): the launch `launch` makes, for tools that compile it
    ahead of time."""
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    group_size = E // n_group
    block_g, block_gs = next_power_of_2(n_group), next_power_of_2(group_size)
    args = (router_logits, correction_bias, weights, ids,
            group_size, n_group, topk_group, top_k, float(routed_scaling_factor),
            *router_logits.stride(), correction_bias.stride(0), *weights.stride(), *ids.stride())
    meta = dict(NORM=bool(norm_topk_prob), BLOCK_G=block_g, BLOCK_GS=block_gs, BLOCK_K=next_power_of_2(top_k),
                num_warps=4 if block_g * block_gs >= 512 else 2 if block_g * block_gs >= 128 else 1)
    return (weights, ids), (T,), args, meta


def launch(*inputs):
    """Runs the kernel on the inputs of plugins/latent_moe_route.py's op; returns (weights, ids)."""
    outputs, grid, args, meta = prepare(*inputs)
    if grid[0]:
        _latent_moe_route_kernel[grid](*args, **meta)
    return outputs
