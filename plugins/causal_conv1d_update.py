"""Decode step of Mamba-2's causal depthwise conv1d with a slot-indexed rolling window.

conv_pool[s] [C, K-1] holds the last K-1 inputs of the sequence in slot s, oldest first. For each of
the T new tokens, in order, channel c:

    window = [conv_pool[s, c, :], x[b, t, c]]                   K values, oldest first
    out[b, t, c] = act(sum_k window[k] * weight[c, k] + bias[c])  fp32 accumulation, act = silu or none
    conv_pool[s, c, :] = window[1:]

`intermediate_states[b, t]` (when given) receives the window after token t. Padding rows (slot < 0)
leave the pool untouched and get out = 0. Slots of one call must be distinct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import eager_reference, functional_mode, use_triton
from .pool_rows import write_rows

WHERE = "plugins/causal_conv1d_update.py"
ACTIVATIONS = ("silu", None)


def causal_conv1d_update_reference(x, conv_pool, weight, bias, slots, activation="silu", intermediate_states=None):
    """Plain-torch specification (module docstring); updates `conv_pool` in place, returns out [Bt, T, C]."""
    T = x.shape[1]
    valid = slots >= 0
    window = conv_pool[slots.clamp(min=0).long()]                          # [Bt, C, K-1]
    outs = []
    for t in range(T):
        full = torch.cat([window, x[:, t, :, None].to(window.dtype)], dim=-1)  # [Bt, C, K]
        out = (full.float() * weight.float()).sum(-1)
        if bias is not None:
            out = out + bias.float()
        if activation == "silu":
            out = F.silu(out)
        outs.append(out)
        window = full[..., 1:]
        if intermediate_states is not None:  # padding rows keep what the buffer held
            step = window.to(intermediate_states.dtype)
            intermediate_states[:, t] = torch.where(valid[:, None, None], step, intermediate_states[:, t])
    write_rows(conv_pool, slots, window)
    out = torch.stack(outs, dim=1) * valid[:, None, None]
    return out.to(x.dtype)


def _check(x, conv_pool, weight, bias, slots, activation, intermediate_states):
    def fail(name, tensor, want):
        raise ValueError(f"{WHERE}: {name} has shape {tuple(tensor.shape)}, expected {want}")

    if x.dim() != 3:
        fail("x", x, "[batch, tokens, channels]")
    Bt, T, Cc = x.shape
    if weight.dim() != 2 or weight.shape[0] != Cc or weight.shape[1] < 2:
        fail("weight", weight, f"[{Cc}, kernel >= 2]")
    K = weight.shape[1]
    if conv_pool.dim() != 3 or tuple(conv_pool.shape[1:]) != (Cc, K - 1):
        fail("conv_pool", conv_pool, f"[slots, {Cc}, {K - 1}]")
    if bias is not None and tuple(bias.shape) != (Cc,):
        fail("bias", bias, str([Cc]))
    if tuple(slots.shape) != (Bt,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{WHERE}: slots is {slots.dtype} {tuple(slots.shape)}, expected int32/int64 [{Bt}]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{WHERE}: activation={activation!r} must be 'silu' or None")
    if intermediate_states is not None:
        if tuple(intermediate_states.shape) != (Bt, T, Cc, K - 1) or intermediate_states.dtype != conv_pool.dtype:
            fail("intermediate_states", intermediate_states, f"{conv_pool.dtype} {[Bt, T, Cc, K - 1]}")


@torch.library.custom_op("nemo3::causal_conv1d_update", mutates_args=("conv_pool", "intermediate_states"))
def _causal_conv1d_update_op(x: torch.Tensor, conv_pool: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, slots: torch.Tensor, silu: bool,
                             intermediate_states: torch.Tensor | None, impl: str) -> torch.Tensor:
    activation = "silu" if silu else None
    if use_triton(impl, x.device, WHERE):
        from .causal_conv1d_update_triton import launch
        return launch(x, conv_pool, weight, bias, slots, silu, intermediate_states)
    return causal_conv1d_update_reference(x, conv_pool, weight, bias, slots, activation, intermediate_states)


@_causal_conv1d_update_op.register_fake
def _(x, conv_pool, weight, bias, slots, silu, intermediate_states, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nemo3::causal_conv1d_update_functional", mutates_args=())
def _causal_conv1d_update_functional(x: torch.Tensor, conv_pool: torch.Tensor, weight: torch.Tensor,
                                     bias: torch.Tensor, slots: torch.Tensor, silu: bool,
                                     intermediate_states: torch.Tensor | None
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op without mutation: (out, the updated pool, the updated intermediate_states or an empty tensor)."""
    pool = conv_pool.clone()
    steps = None if intermediate_states is None else intermediate_states.clone()
    out = causal_conv1d_update_reference(x, pool, weight, bias, slots, "silu" if silu else None, steps)
    return out, pool, conv_pool.new_empty(0) if steps is None else steps


@_causal_conv1d_update_functional.register_fake
def _(x, conv_pool, weight, bias, slots, silu, intermediate_states):
    steps = conv_pool.new_empty(0) if intermediate_states is None else torch.empty_like(intermediate_states)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(conv_pool), steps


def causal_conv1d_update(x, conv_pool, weight, bias, slots, activation="silu", intermediate_states=None, *,
                         impl=None):
    """Conv decode step (module docstring), through the `nemo3::causal_conv1d_update` op.

    x [Bt, T, C]; conv_pool [S, C, K-1] (updated in place); weight [C, K]; bias [C] or None;
    slots [Bt] int (< 0: padding); activation "silu" or None;
    intermediate_states [Bt, T, C, K-1] (conv_pool's dtype) or None. Returns out [Bt, T, C] in x.dtype.
    `impl`: "auto" | "triton" | "reference" (default: $NEMO3_KERNEL_IMPL or "auto", see plugins/dispatch.py).
    """
    _check(x, conv_pool, weight, bias, slots, activation, intermediate_states)
    if eager_reference(impl, x.device, WHERE):
        return causal_conv1d_update_reference(x, conv_pool, weight, bias, slots, activation, intermediate_states)
    if functional_mode():  # (a missing bias is a zero bias: plugin nodes take a fixed list of inputs)
        out, pool, steps = _causal_conv1d_update_functional(
            x, conv_pool, weight, weight.new_zeros(weight.shape[0]) if bias is None else bias, slots,
            activation == "silu", intermediate_states)
        conv_pool.copy_(pool)
        if intermediate_states is not None:
            intermediate_states.copy_(steps)
        return out
    return _causal_conv1d_update_op(x, conv_pool, weight, bias, slots, activation == "silu", intermediate_states,
                                    impl or "")
