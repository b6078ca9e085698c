"""plugins/mamba2_state_update.py: reference vs transformers' decode recurrence, Triton kernel vs reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, also when this file runs alone

import pytest
import torch

from conftest import hf_model, make_config
from nemo3.plugins.causal_conv1d_update import causal_conv1d_update_reference
from nemo3.plugins.dispatch import interpreter_enabled, triton_available
from nemo3.plugins.mamba2_state_update import mamba2_state_update, mamba2_state_update_reference

needs_triton = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                  reason="triton is not importable or TRITON_INTERPRET is off: "
                                         "the Triton kernel cannot run on CPU")


def make_inputs(Bt, T, H, P, N, G, dtype=torch.float32, pool_slots=6, slots=None, z=True, strided=False, seed=0):
    """Decode inputs. strided: x/B/C/z/dt are views into one packed projection (as in the network), the
    state pool is a transposed (non-contiguous) view and slots a strided view."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    if strided:
        I, GN = H * P, G * N
        packed = randn(Bt, T, 2 * I + 2 * GN + H + 3)
        xs, Bs, Cs, zs, dts = packed[..., 1:].split([I, GN, GN, I, H + 2], dim=-1)
        x, B, C = xs.unflatten(-1, (H, P)), Bs.unflatten(-1, (G, N)), Cs.unflatten(-1, (G, N))
        zt, dt = zs.unflatten(-1, (H, P)), dts[..., 1:H + 1]
        pool = torch.randn(pool_slots, H, N, P, generator=g).transpose(2, 3)
    else:
        x, zt, dt = randn(Bt, T, H, P), randn(Bt, T, H, P), randn(Bt, T, H)
        B, C = randn(Bt, T, G, N), randn(Bt, T, G, N)
        pool = torch.randn(pool_slots, H, P, N, generator=g)
    if slots is None:
        slots = torch.randperm(pool_slots, generator=g)[:Bt]
    return dict(
        state_pool=pool, x=x, dt=dt, A=-torch.exp(0.5 * torch.randn(H, generator=g)), B=B, C=C,
        D=torch.randn(H, generator=g), dt_bias=0.5 * torch.randn(H, generator=g),
        slots=torch.as_tensor(slots, dtype=torch.int32).repeat_interleave(2)[::2] if strided
        else torch.as_tensor(slots, dtype=torch.int32), z=zt if z else None,
    )


def run(impl, inputs, intermediate=False, **kwargs):
    """(y, pool after, intermediate states or None) on copies of the inputs."""
    args = dict(inputs, state_pool=inputs["state_pool"].clone())
    Bt, T, H, P = inputs["x"].shape
    inter = torch.full((Bt, T, H, P, inputs["state_pool"].shape[3]), -7.0) if intermediate else None
    y = mamba2_state_update(**args, intermediate_states=inter, impl=impl, **kwargs)
    return y, args["state_pool"], inter


def assert_same(got, want, dtype):
    for g, w in zip(got, want):
        if w is not None:
            tol = dict(atol=1e-5, rtol=1e-5) if w.dtype == torch.float32 else {}
            torch.testing.assert_close(g, w, **tol)


# ---- the reference against transformers -------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_decode_step_matches_transformers(impl):
    """One decode token through conv update + state update + gated norm + out_proj equals
    NemotronHMamba2Mixer.torch_forward's decode branch; pool slots end equal to its cache."""
    model = hf_model(make_config("plain_moe"))
    mixer = model.model.layers[0].mixer
    torch.manual_seed(1)
    with torch.no_grad():
        cache = model(torch.randint(0, 96, (2, 5)), use_cache=True).past_key_values
        layer = cache.layers[0]
        conv_before, ssm_before = layer.conv_states[0].clone(), layer.recurrent_states[0].clone()
        u = torch.randn(2, 1, mixer.hidden_size)
        want = mixer.torch_forward(u, cache_params=cache)

        # our pools: 5 slots, the two sequences in slots 3 and 1, plus a padding row
        slots = torch.tensor([3, 1, -1])
        K, H, P, N, G = mixer.conv_kernel_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
        conv_pool = torch.randn(5, mixer.conv_dim, K - 1)
        conv_pool[slots[:2]] = conv_before[..., 1:]          # transformers keeps K inputs, we keep K-1
        ssm_pool = torch.randn(5, H, P, N)
        ssm_pool[slots[:2]] = ssm_before
        untouched = ssm_pool[[0, 2, 4]].clone()

        proj = mixer.in_proj(torch.cat([u, torch.randn(1, 1, mixer.hidden_size)]))
        z, xBC, dt = proj.split([mixer.intermediate_size, mixer.conv_dim, H], dim=-1)
        xBC = causal_conv1d_update_reference(xBC, conv_pool, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, slots)
        x, B, C = xBC.split([mixer.intermediate_size, G * N, G * N], dim=-1)
        y = mamba2_state_update(ssm_pool, x.unflatten(-1, (H, P)), dt, -torch.exp(mixer.A_log), B.unflatten(-1, (G, N)),
                                C.unflatten(-1, (G, N)), mixer.D, mixer.dt_bias, slots,
                                dt_limit=(mixer.time_step_min, math.inf), impl=impl)  # transformers clamps at dt_min
        got = mixer.out_proj(mixer.norm(y.flatten(-2), z))

    torch.testing.assert_close(got[:2], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ssm_pool[slots[:2]], layer.recurrent_states[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_pool[slots[:2]], layer.conv_states[0][..., 1:], atol=1e-6, rtol=1e-6)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    assert torch.equal(ssm_pool[[0, 2, 4]], untouched)


# ---- the Triton kernel against the reference ------------------------------------------------------------------

SHAPES = {  # (H, P, N, G)
    "nonpow2_grouped": (6, 5, 7, 2),
    "heads_eq_groups": (4, 8, 16, 4),
    "one_group_p_blocks": (3, 20, 160, 1),   # N pads to 256: blocks of 8, 8 and 4 rows of P per head
}


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype):
    H, P, N, G = SHAPES[shape]
    inputs = make_inputs(3, 1, H, P, N, G, dtype, pool_slots=7, slots=[5, -1, 2], z=dtype != torch.float16)
    ref = run("reference", inputs)
    got = run("triton", inputs)
    assert got[0].dtype == dtype
    assert_same(got, ref, dtype)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))   # padding row
    keep = [0, 1, 3, 4, 6]
    assert torch.equal(got[1][keep], inputs["state_pool"][keep])  # only slots 5 and 2 changed
    assert not torch.equal(got[1][5], inputs["state_pool"][5])


@needs_triton
@pytest.mark.parametrize("z", [True, False])
def test_kernel_strided_inputs_and_pool(z):
    inputs = make_inputs(2, 2, 6, 5, 7, 3, torch.bfloat16, slots=[4, 0], z=z, strided=True)
    assert not any(inputs[k].is_contiguous() for k in ("x", "B", "dt", "state_pool", "slots"))
    assert_same(run("triton", inputs, intermediate=True), run("reference", inputs, intermediate=True), torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("dt_softplus, dt_limit", [(True, (0.05, 0.7)), (False, (0.0, math.inf))])
def test_kernel_dt_options(dt_softplus, dt_limit):
    inputs = make_inputs(2, 1, 4, 6, 8, 2)
    inputs["dt"] = inputs["dt"].abs()  # without softplus dt must be positive to be a step size
    opts = dict(dt_softplus=dt_softplus, dt_limit=dt_limit)
    assert_same(run("triton", inputs, **opts), run("reference", inputs, **opts), torch.float32)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_k_tokens_equal_k_single_steps(impl):
    """T=3 (speculative verification) = three T=1 calls; intermediate_states[t] = the state after token t."""
    T, slots = 3, [2, -1, 0]
    inputs = make_inputs(3, T, 6, 5, 7, 2, slots=slots)
    y, pool, inter = run(impl, inputs, intermediate=True)

    step_pool = inputs["state_pool"].clone()
    for t in range(T):
        step = {k: (v[:, t:t + 1] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
        y_t = mamba2_state_update_reference(**dict(step, state_pool=step_pool))
        torch.testing.assert_close(y[:, t:t + 1], y_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inter[[0, 2], t], step_pool[[2, 0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool, step_pool, atol=1e-5, rtol=1e-5)
    assert torch.equal(inter[1], torch.full_like(inter[1], -7.0))   # padding row's intermediate states untouched


@needs_triton
def test_state_reused_across_calls():
    """Three decode calls on the same pool, sequences moving between batch rows, agree with the reference."""
    ref_pool = make_inputs(1, 1, 6, 5, 7, 2)["state_pool"]
    kernel_pool = ref_pool.clone()
    for step, slots in enumerate([[1, 4, -1], [4, -1, 1], [3, 1, 4]]):
        inputs = make_inputs(3, 1, 6, 5, 7, 2, slots=slots, seed=10 + step)
        y_ref = mamba2_state_update(**dict(inputs, state_pool=ref_pool), impl="reference")
        y_kernel = mamba2_state_update(**dict(inputs, state_pool=kernel_pool), impl="triton")
        torch.testing.assert_close(y_kernel, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_pool, ref_pool, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_tensor():
    inputs = make_inputs(2, 1, 4, 6, 8, 2)
    with pytest.raises(ValueError, match="mamba2_state_update.py: B has shape"):
        mamba2_state_update(**dict(inputs, B=inputs["B"][..., :5]))
    with pytest.raises(ValueError, match="state_pool is torch.bfloat16"):
        mamba2_state_update(**dict(inputs, state_pool=inputs["state_pool"].bfloat16()))
    with pytest.raises(ValueError, match="impl='cuda' must be one of"):
        mamba2_state_update(**inputs, impl="cuda")


def test_custom_op_registration():
    """The op's fake implementation and schema (mutated pool) pass torch's own checks."""
    inputs = make_inputs(2, 2, 4, 6, 8, 2, slots=[1, -1])
    args = tuple(inputs.values()) + (True, 0.0, math.inf, torch.zeros(2, 2, 4, 6, 8), "reference")
    torch.library.opcheck(torch.ops.nemo3.mamba2_state_update.default, args,
                          test_utils=("test_schema", "test_faketensor"))


COMPILE_AT_NANO_SHAPES = """
import torch
from nemo3.plugins.aot import compile_launch
from nemo3.plugins.mamba2_state_update_triton import _mamba2_state_update_kernel, prepare

Bt, T, H, P, N, G = 4, 2, 64, 64, 128, 8
act = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)
y, grid, args, meta = prepare(torch.zeros(8, H, P, N), act(Bt, T, H, P), act(Bt, T, H), torch.zeros(H),
                              act(Bt, T, G, N), act(Bt, T, G, N), torch.zeros(H), torch.zeros(H),
                              torch.zeros(Bt, dtype=torch.int32), act(Bt, T, H, P), True, 0.0, float("inf"),
                              torch.zeros(Bt, T, H, P, N))
ptx = compile_launch(_mamba2_state_update_kernel, args, meta, capability=90).asm["ptx"]
vector_loads = ptx.count("ld.global.v4.b32")   # 4 floats each, per thread
assert vector_loads * 4 * 32 * meta["num_warps"] == meta["BLOCK_P"] * N, "state not read in 16-byte loads"
assert "st.global.v4.b32" in ptx, "state not written in 16-byte stores"
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not importable: nothing to compile")
def test_kernel_compiles_for_hopper():
    """Triton's compiler (stricter than its interpreter) builds the kernel for sm_90 at Nano shapes, and the
    fp32 state tile is read and written with 16-byte vector accesses, each element once."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COMPILE_AT_NANO_SHAPES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
