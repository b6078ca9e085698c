"""Mamba-2 decode step: T tokens (1 for decode, k for speculative verification) through the SSM state.

Per sequence b with pool slot s = slots[b] >= 0, head h (group g = h // (H/G)) and token t, in fp32:

    dt    = clamp(softplus(dt[b,t,h] + dt_bias[h]), *dt_limit)      (softplus only if dt_softplus)
    state = state * exp(dt * A[h]) + dt * x[b,t,h,:] ⊗ B[b,t,g,:]      state: state_pool[s, h] [P, N]
    y     = state @ C[b,t,g,:] + D[h] * x[b,t,h,:]                       (* silu(z[b,t,h,:]) when z given)

The pool slot ends with the state after the last token; `intermediate_states[b, t]` (when given)
receives the state after token t, so the runtime can keep the state of the last accepted draft token.
Padding rows (slot < 0) leave the pool untouched and get y = 0. Slots of one call must be distinct.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import eager_reference, functional_mode, use_triton
from .pool_rows import write_rows

WHERE = "plugins/mamba2_state_update.py"
FLOAT_MAX = torch.finfo(torch.float32).max  # an unbounded dt limit, as op arguments spell it (no inf in graphs)


def mamba2_state_update_reference(state_pool, x, dt, A, B, C, D, dt_bias, slots, z=None, dt_softplus=True,
                                  dt_limit=(0.0, math.inf), intermediate_states=None):
    """Plain-torch specification (see the module docstring); updates `state_pool` in place, returns y [Bt, T, H, P]."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    valid = slots >= 0

    dt = dt.float() + dt_bias.float()                                       # [Bt, T, H]
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    # heads in groups: head h = g * (H/G) + j reads B[:, :, g] and C[:, :, g]
    Bg = B.float()[:, :, :, None, None, :]                                  # [Bt, T, G, 1, 1, N]
    Cg = C.float()[:, :, :, None, None, :]
    xg = x.float().reshape(Bt, T, G, H // G, P)                              # [Bt, T, G, H/G, P]
    dtg = dt.reshape(Bt, T, G, H // G)
    dA = torch.exp(dt * A.float()).reshape(Bt, T, G, H // G)

    state = state_pool[slots.clamp(min=0).long()].float().view(Bt, G, H // G, P, N)
    ys = []
    for t in range(T):
        state = state * dA[:, t, ..., None, None] + (dtg[:, t, ..., None] * xg[:, t])[..., None] * Bg[:, t]
        ys.append((state * Cg[:, t]).sum(-1))                              # [Bt, G, H/G, P]
        if intermediate_states is not None:  # padding rows keep what the buffer held
            step = state.view(Bt, H, P, N).to(intermediate_states.dtype)
            intermediate_states[:, t] = torch.where(valid[:, None, None, None], step, intermediate_states[:, t])
    write_rows(state_pool, slots, state.view(Bt, H, P, N))
    y = torch.stack(ys, dim=1).view(Bt, T, H, P) + D.float()[:, None] * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y * valid[:, None, None, None]
    return y.to(x.dtype)


def _check(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, intermediate_states):
    def fail(name, tensor, want):
        raise ValueError(f"{WHERE}: {name} has shape {tuple(tensor.shape)}, expected {want}")

    if x.dim() != 4:
        fail("x", x, "[batch, tokens, heads, head_dim]")
    Bt, T, H, P = x.shape
    if state_pool.dim() != 4 or tuple(state_pool.shape[1:3]) != (H, P):
        fail("state_pool", state_pool, f"[slots, {H}, {P}, state]")
    if state_pool.dtype != torch.float32:
        raise ValueError(f"{WHERE}: state_pool is {state_pool.dtype}, expected torch.float32")
    N = state_pool.shape[3]
    if B.dim() != 4 or tuple(B.shape[:2]) != (Bt, T) or B.shape[3] != N or H % B.shape[2]:
        fail("B", B, f"[{Bt}, {T}, groups dividing {H}, {N}]")
    if C.shape != B.shape:
        fail("C", C, str(list(B.shape)))
    if tuple(dt.shape) != (Bt, T, H):
        fail("dt", dt, str([Bt, T, H]))
    for name, tensor in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if tuple(tensor.shape) != (H,):
            fail(name, tensor, str([H]))
    if tuple(slots.shape) != (Bt,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{WHERE}: slots is {slots.dtype} {tuple(slots.shape)}, expected int32/int64 [{Bt}]")
    if z is not None and z.shape != x.shape:
        fail("z", z, str(list(x.shape)))
    if intermediate_states is not None:
        if tuple(intermediate_states.shape) != (Bt, T, H, P, N) or intermediate_states.dtype != torch.float32:
            fail("intermediate_states", intermediate_states, f"float32 {[Bt, T, H, P, N]}")


@torch.library.custom_op("nemo3::mamba2_state_update", mutates_args=("state_pool", "intermediate_states"))
def _mamba2_state_update_op(state_pool: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                            B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                            slots: torch.Tensor, z: torch.Tensor | None, dt_softplus: bool, dt_min: float,
                            dt_max: float, intermediate_states: torch.Tensor | None, impl: str) -> torch.Tensor:
    if use_triton(impl, x.device, WHERE):
        from .mamba2_state_update_triton import launch
        return launch(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, dt_softplus, dt_min, dt_max,
                      intermediate_states)
    return mamba2_state_update_reference(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, dt_softplus,
                                         (dt_min, dt_max), intermediate_states)


@_mamba2_state_update_op.register_fake
def _(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, dt_softplus, dt_min, dt_max, intermediate_states, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nemo3::mamba2_state_update_functional", mutates_args=())
def _mamba2_state_update_functional(state_pool: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                    B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                                    slots: torch.Tensor, dt_softplus: bool, dt_min: float, dt_max: float,
                                    intermediate_states: torch.Tensor | None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op without mutation: (y, the updated pool, the updated intermediate_states or an empty tensor)."""
    pool = state_pool.clone()
    steps = None if intermediate_states is None else intermediate_states.clone()
    y = mamba2_state_update_reference(pool, x, dt, A, B, C, D, dt_bias, slots, None, dt_softplus, (dt_min, dt_max),
                                      steps)
    return y, pool, state_pool.new_empty(0) if steps is None else steps


@_mamba2_state_update_functional.register_fake
def _(state_pool, x, dt, A, B, C, D, dt_bias, slots, dt_softplus, dt_min, dt_max, intermediate_states):
    steps = state_pool.new_empty(0) if intermediate_states is None else torch.empty_like(intermediate_states)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(state_pool), steps


def mamba2_state_update(state_pool, x, dt, A, B, C, D, dt_bias, slots, z=None, dt_softplus=True,
                        dt_limit=(0.0, math.inf), intermediate_states=None, *, impl=None):
    """One or more SSM decode steps (module docstring), through the `nemo3::mamba2_state_update` op.

    state_pool [S, H, P, N] fp32 (updated in place); x [Bt, T, H, P]; dt [Bt, T, H] (raw); A, D, dt_bias [H];
    B, C [Bt, T, G, N]; slots [Bt] int (< 0: padding); z [Bt, T, H, P] or None;
    intermediate_states [Bt, T, H, P, N] fp32 or None. Returns y [Bt, T, H, P] in x.dtype.
    `impl`: "auto" | "triton" | "reference" (default: $NEMO3_KERNEL_IMPL or "auto", see plugins/dispatch.py).
    """
    _check(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, intermediate_states)
    if eager_reference(impl, x.device, WHERE):
        return mamba2_state_update_reference(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, dt_softplus,
                                             dt_limit, intermediate_states)
    if functional_mode():
        if z is not None:
            raise ValueError(f"{WHERE}: z is not supported by the functional op (the network gates y itself)")
        y, pool, steps = _mamba2_state_update_functional(state_pool, x, dt, A, B, C, D, dt_bias, slots,
                                                         bool(dt_softplus), float(dt_limit[0]),
                                                         min(float(dt_limit[1]), FLOAT_MAX), intermediate_states)
        state_pool.copy_(pool)
        if intermediate_states is not None:
            intermediate_states.copy_(steps)
        return y
    return _mamba2_state_update_op(state_pool, x, dt, A, B, C, D, dt_bias, slots, z, bool(dt_softplus),
                                   float(dt_limit[0]), float(dt_limit[1]), intermediate_states, impl or "")
