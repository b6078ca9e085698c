"""plugins/causal_conv1d_update.py: reference vs transformers' conv1d, Triton kernel (interpreter) vs reference."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, also when this file runs alone

import pytest
import torch

from conftest import hf_model, make_config
from nemo3.plugins.causal_conv1d_update import causal_conv1d_update, causal_conv1d_update_reference
from nemo3.plugins.dispatch import interpreter_enabled, triton_available

needs_triton = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                  reason="triton is not importable or TRITON_INTERPRET is off: "
                                         "the Triton kernel cannot run on CPU")


def make_inputs(Bt, T, C, K, dtype=torch.float32, pool_slots=6, slots=None, bias=True, strided=False, seed=0):
    """strided: x is a slice of a wider projection, the pool a transposed [S, K-1, C] buffer, slots a strided view."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        x = torch.randn(Bt, T, C + 9, generator=g).to(dtype)[..., 4:C + 4]
        pool = torch.randn(pool_slots, K - 1, C, generator=g).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(Bt, T, C, generator=g).to(dtype)
        pool = torch.randn(pool_slots, C, K - 1, generator=g).to(dtype)
    if slots is None:
        slots = torch.randperm(pool_slots, generator=g)[:Bt]
    return dict(x=x, conv_pool=pool, weight=(0.5 * torch.randn(C, K, generator=g)).to(dtype),
                bias=(0.1 * torch.randn(C, generator=g)).to(dtype) if bias else None,
                slots=torch.as_tensor(slots).repeat_interleave(2)[::2] if strided else torch.as_tensor(slots))


def run(impl, inputs, intermediate=False, **kwargs):
    """(out, pool after, intermediate windows or None) on copies of the inputs."""
    pool = inputs["conv_pool"].clone()
    Bt, T, C = inputs["x"].shape
    inter = torch.full((Bt, T, C, pool.shape[2]), -7.0, dtype=pool.dtype) if intermediate else None
    out = causal_conv1d_update(**dict(inputs, conv_pool=pool), intermediate_states=inter, impl=impl, **kwargs)
    return out, pool, inter


def assert_same(got, want):
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, **(dict(atol=1e-5, rtol=1e-5) if w.dtype == torch.float32 else {}))


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_matches_transformers_conv1d(impl):
    """T tokens after a stored window equal the mixer's own nn.Conv1d (+ SiLU) over [window | tokens]."""
    mixer = hf_model(make_config("plain_moe")).model.layers[0].mixer
    K, C, T = mixer.conv_kernel_size, mixer.conv_dim, 3
    inputs = make_inputs(2, T, C, K, slots=[4, 1])
    inputs.update(weight=mixer.conv1d.weight.detach()[:, 0], bias=mixer.conv1d.bias.detach())
    out, pool, _ = run(impl, inputs)
    with torch.no_grad():
        sequence = torch.cat([inputs["conv_pool"][[4, 1]], inputs["x"].transpose(1, 2)], dim=-1)  # [2, C, K-1+T]
        want = mixer.act(mixer.conv1d(sequence)[..., K - 1:K - 1 + T]).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool[[4, 1]], sequence[..., -(K - 1):])


@needs_triton
@pytest.mark.parametrize("C, K", [(300, 4), (17, 2), (40, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(C, K, dtype):
    inputs = make_inputs(3, 1, C, K, dtype, pool_slots=7, slots=[5, -1, 2])
    got, ref = run("triton", inputs), run("reference", inputs)
    assert got[0].dtype == dtype
    assert_same(got, ref)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))    # padding row
    keep = [0, 1, 3, 4, 6]
    assert torch.equal(got[1][keep], inputs["conv_pool"][keep])   # only slots 5 and 2 changed


@needs_triton
@pytest.mark.parametrize("activation, bias", [(None, True), ("silu", False)])
def test_kernel_options_and_strided(activation, bias):
    inputs = make_inputs(2, 2, 37, 4, torch.bfloat16, slots=[3, 0], bias=bias, strided=True)
    assert not any(inputs[k].is_contiguous() for k in ("x", "conv_pool", "slots"))
    opts = dict(intermediate=True, activation=activation)
    assert_same(run("triton", inputs, **opts), run("reference", inputs, **opts))


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("T", [2, 5])  # fewer and more tokens than the window holds
def test_k_tokens_equal_k_single_steps(impl, T):
    inputs = make_inputs(3, T, 19, 4, slots=[2, -1, 0])
    out, pool, inter = run(impl, inputs, intermediate=True)
    step_pool = inputs["conv_pool"].clone()
    for t in range(T):
        out_t = causal_conv1d_update_reference(**dict(inputs, x=inputs["x"][:, t:t + 1], conv_pool=step_pool))
        torch.testing.assert_close(out[:, t:t + 1], out_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inter[[0, 2], t], step_pool[[2, 0]])
    torch.testing.assert_close(pool, step_pool)
    assert torch.equal(inter[1], torch.full_like(inter[1], -7.0))


@needs_triton
def test_state_reused_across_calls():
    ref_pool = make_inputs(1, 1, 23, 4)["conv_pool"]
    kernel_pool = ref_pool.clone()
    for step, slots in enumerate([[1, 4, -1], [4, -1, 1], [3, 1, 4]]):
        inputs = make_inputs(3, 1, 23, 4, slots=slots, seed=10 + step)
        out_ref = causal_conv1d_update(**dict(inputs, conv_pool=ref_pool), impl="reference")
        out_kernel = causal_conv1d_update(**dict(inputs, conv_pool=kernel_pool), impl="triton")
        torch.testing.assert_close(out_kernel, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_pool, ref_pool)


def test_bad_inputs_name_the_tensor():
    inputs = make_inputs(2, 1, 8, 4)
    with pytest.raises(ValueError, match="causal_conv1d_update.py: conv_pool has shape"):
        causal_conv1d_update(**dict(inputs, conv_pool=inputs["conv_pool"][..., :2]))
    with pytest.raises(ValueError, match="activation='gelu'"):
        causal_conv1d_update(**inputs, activation="gelu")


def test_custom_op_registration():
    inputs = make_inputs(2, 2, 8, 4, slots=[1, -1])
    args = tuple(inputs.values()) + (True, torch.zeros(2, 2, 8, 3), "reference")
    torch.library.opcheck(torch.ops.nemo3.causal_conv1d_update.default, args,
                          test_utils=("test_schema", "test_faketensor"))


COMPILE_AT_NANO_SHAPES = """
import torch
from nemo3.plugins.aot import compile_launch
from nemo3.plugins.causal_conv1d_update_triton import _causal_conv1d_update_kernel, prepare

Bt, T, C, K = 4, 2, 64 * 64 + 2 * 8 * 128, 4
act = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)
for inter in (None, act(Bt, T, C, K - 1)):
    out, grid, args, meta = prepare(act(Bt, T, C), act(8, C, K - 1), act(C, K), act(C),
                                    torch.zeros(Bt, dtype=torch.int32), True, inter)
    assert "ptx" in compile_launch(_causal_conv1d_update_kernel, args, meta, capability=90).asm
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not importable: nothing to compile")
def test_kernel_compiles_for_hopper():
    """Triton's compiler (stricter than its interpreter) builds the kernel for sm_90 at Nano shapes."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COMPILE_AT_NANO_SHAPES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
