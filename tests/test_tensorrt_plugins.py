"""plugins/tensorrt_kernels.py: each nemo3 node's TensorRT AOT kernel (a wrapper with TensorRT's argument order
around the op's Triton kernel) computes the op's reference in Triton's interpreter when called as TensorRT calls it
(inputs, then outputs, aliased outputs = their inputs), compiles to PTX for sm_90, and launches with the grid,
threads and shared memory of the op's own Triton launch. plugins/tensorrt_plugins.py needs tensorrt."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, also when this file runs alone

import pytest
import torch

from nemo3.plugins.causal_conv1d_update import causal_conv1d_update_reference
from nemo3.plugins.dispatch import interpreter_enabled, triton_available
from nemo3.plugins.latent_moe_route import latent_moe_route_reference
from nemo3.plugins.mamba2_state_update import FLOAT_MAX, mamba2_state_update_reference
from nemo3.plugins.paged_attention import paged_attention_reference

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable: no kernel to build")
ATTRS = {"causal_conv1d_update": {"silu": 1}, "mamba2_state_update": {"dt_softplus": 1, "dt_min": 0.0,
                                                                       "dt_max": FLOAT_MAX},
         "latent_moe_route": {"top_k": 3, "n_group": 4, "topk_group": 2, "norm_topk_prob": 1,
                              "routed_scaling_factor": 2.5},
         "paged_attention": {"scale": 0.3, "max_pages": -1}, "paged_attention_fp8": {"scale": 0.3, "max_pages": -1}}


def node_inputs(op_type, steps, g, Bt=3, T=2, slots=(2, -1, 0)):
    """Random inputs of node `op_type` (the `_steps` variant: intermediate states last), float32, dense."""
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    slots = torch.tensor(slots, dtype=torch.int32)
    if op_type == "causal_conv1d_update":
        C, K = 40, 4
        inputs = [rand(Bt, T, C), rand(4, C, K - 1), rand(C, K), rand(C), slots]
        return inputs + ([torch.zeros(Bt, T, C, K - 1)] if steps else [])
    if op_type == "mamba2_state_update":
        H, P, N, G = 4, 6, 16, 2
        inputs = [rand(4, H, P, N), rand(Bt, T, H, P), rand(Bt, T, H), -rand(H).abs(), rand(Bt, T, G, N),
                  rand(Bt, T, G, N), rand(H), rand(H), slots]
        return inputs + ([torch.zeros(Bt, T, H, P, N)] if steps else [])
    if op_type.startswith("paged_attention"):
        return attention_inputs(op_type.endswith("fp8"), g, T)
    return [rand(5, 16), 0.1 * rand(16)]


def attention_inputs(fp8, g, T, H=6, KV=2, D=16, page=16, width=4, lens=(0, 16, 17, 50, 2)):
    """GQA (3 query heads per KV head) over pages in a random order: a padding row, rows ending on and just past
    a page boundary, one over 4 pages, one with no history; table entries past a row's pages are -1."""
    B = len(lens)
    order = torch.randperm(B * width, generator=g).view(B, width).to(torch.int32)
    lens = torch.tensor(lens, dtype=torch.int32)
    table = torch.where(torch.arange(width) * page < lens[:, None], order, -1).to(torch.int32)
    q = torch.randn(B, T, H, D, generator=g)
    k, v = (torch.randn(B * width, page, KV, D, generator=g) for _ in range(2))
    if not fp8:
        return [q, k, v, table, lens]
    k_scale, v_scale = torch.tensor(0.02), torch.tensor(0.03)
    return [q, (k / k_scale).to(torch.float8_e4m3fn), (v / v_scale).to(torch.float8_e4m3fn), table, lens, k_scale,
            v_scale]


def reference(op_type, inputs, attrs):
    """The op's reference on copies: the node's outputs (an aliased output is its input's updated copy)."""
    inputs = [t.clone() for t in inputs]
    if op_type.startswith("causal_conv1d_update"):
        x, pool, weight, bias, slots, *steps = inputs
        out = causal_conv1d_update_reference(x, pool, weight, bias, slots, "silu", steps[0] if steps else None)
        return [out, pool, *steps]
    if op_type.startswith("mamba2_state_update"):
        state, x, dt, A, B, C, D, dt_bias, slots, *steps = inputs
        y = mamba2_state_update_reference(state, x, dt, A, B, C, D, dt_bias, slots, None, True,
                                          (attrs["dt_min"], attrs["dt_max"]), steps[0] if steps else None)
        return [y, state, *steps]
    if op_type.startswith("paged_attention"):
        return [paged_attention_reference(*inputs[:5], attrs["scale"], *inputs[5:])]
    return list(latent_moe_route_reference(*inputs, attrs["top_k"], attrs["n_group"], attrs["topk_group"],
                                           bool(attrs["norm_topk_prob"]), attrs["routed_scaling_factor"]))


NODES = [(op, False) for op in ATTRS] + [("causal_conv1d_update", True), ("mamba2_state_update", True)]


@pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                    reason="triton is not importable or TRITON_INTERPRET is off: the kernels cannot run on CPU")
@pytest.mark.parametrize("op,steps", NODES)
def test_wrapper_called_as_tensorrt_calls_it_computes_the_reference(op, steps):
    from nemo3.plugins.tensorrt_kernels import launch_plan

    inputs = node_inputs(op, steps, torch.Generator().manual_seed(0))
    op_type = op + ("_steps" if steps else "")
    expected = reference(op_type, inputs, ATTRS[op])
    plan = launch_plan(op_type, inputs, ATTRS[op])
    plan.kernel[plan.grid](*inputs, *plan.outputs, num_warps=plan.num_warps, **plan.constexprs)
    assert len(plan.outputs) == len(expected)
    for got, want in zip(plan.outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


COMPILE_AT_NANO_SHAPES = """
import torch
from nemo3.plugins.aot import compile_launch
from nemo3.plugins.mamba2_state_update import FLOAT_MAX
from nemo3.plugins.tensorrt_kernels import SHARED_MEMORY_LIMIT, compile_plugin
from nemo3.plugins import causal_conv1d_update_triton as conv, mamba2_state_update_triton as mamba
from nemo3.plugins import latent_moe_route_triton as route, paged_attention_triton as attention

Bt, T, H, P, N, G, K, E = 8, 3, 64, 64, 128, 8, 4, 128
C = H * P + 2 * G * N
def act(*shape, dtype=torch.bfloat16):
    return torch.zeros(*shape, dtype=dtype)
slots = act(Bt, dtype=torch.int32)
fp32 = torch.float32
cases = []
for steps in (False, True):
    inter = act(Bt, T, C, K - 1) if steps else None
    conv_in = [act(Bt, T, C), act(16, C, K - 1), act(C, K), act(C), slots]
    cases.append(("causal_conv1d_update", conv_in, inter, {"silu": 1}, conv._causal_conv1d_update_kernel,
                  conv.prepare(*conv_in, True, inter, on_gpu=True)))
    inter = act(Bt, T, H, P, N, dtype=fp32) if steps else None
    m_in = [act(16, H, P, N, dtype=fp32), act(Bt, T, H, P), act(Bt, T, H), act(H, dtype=fp32), act(Bt, T, G, N),
            act(Bt, T, G, N), act(H, dtype=fp32), act(H, dtype=fp32), slots]
    attrs = {"dt_softplus": 1, "dt_min": 0.0, "dt_max": FLOAT_MAX}
    cases.append(("mamba2_state_update", m_in, inter, attrs, mamba._mamba2_state_update_kernel,
                  mamba.prepare(*m_in, None, True, 0.0, FLOAT_MAX, inter, on_gpu=True)))
r_in = [act(Bt, E, dtype=fp32), act(E, dtype=fp32)]
attrs = {"top_k": 6, "n_group": 1, "topk_group": 1, "norm_topk_prob": 1, "routed_scaling_factor": 2.5}
cases.append(("latent_moe_route", r_in, None, attrs, route._latent_moe_route_kernel,
              route.prepare(*r_in, 6, 1, 1, True, 2.5)))
Hq, KV, D, page, width = 32, 2, 128, 64, 16
a_in = [act(Bt, T, Hq, D), act(64, page, KV, D), act(64, page, KV, D), act(Bt, width, dtype=torch.int32), slots]
fp8_pages = act(64, page, KV, D, dtype=torch.float8_e4m3fn)
fp8_in = a_in[:1] + [fp8_pages, fp8_pages] + a_in[3:] + [torch.ones(()), torch.ones(())]
for op, a_inputs in (("paged_attention", a_in), ("paged_attention_fp8", fp8_in)):
    cases.append((op, a_inputs, None, {"scale": 0.088, "max_pages": -1}, attention._paged_attention_kernel,
                  attention.prepare(*a_inputs[:5], 0.088, *a_inputs[5:], splits=1)))
stages = {}
for op, inputs, inter, attrs, kernel, (_, grid, args, meta) in cases:
    op_type = op if inter is None else op + "_steps"
    plugin = compile_plugin(op_type, inputs + ([] if inter is None else [inter]), attrs, capability=90)
    assert ".target sm_90" in plugin.ptx and f".entry {plugin.name}(" in plugin.ptx, op_type
    triton_launch = compile_launch(kernel, args, dict(meta, num_stages=plugin.num_stages), capability=90).metadata
    expected = (tuple(grid) + (1,) * (3 - len(grid)), triton_launch.num_warps * 32, triton_launch.shared)
    assert (plugin.grid, plugin.block, plugin.shared_mem) == expected, (op_type, plugin, expected)
    assert plugin.shared_mem <= SHARED_MEMORY_LIMIT, (op_type, plugin.shared_mem)
    default = compile_launch(kernel, args, meta, capability=90).metadata  # the GPU launch's own pipelining
    assert plugin.num_stages == default.num_stages or default.shared > SHARED_MEMORY_LIMIT, (op_type, default)
    stages[op_type] = (plugin.num_stages, default.num_stages, default.shared)
    print(op_type, plugin.name, plugin.grid, plugin.block, plugin.shared_mem, stages[op_type])
assert stages["paged_attention"][0] < stages["paged_attention"][1], stages  # (its default launch: 81,924 B)
"""


@needs_triton
def test_plugins_compile_for_hopper_with_the_triton_launch_parameters():
    """At Nano shapes (bf16 activations, fp32 SSM state), every node's kernel compiles to PTX for sm_90 and its
    launch parameters equal those of the op's own Triton launch on a GPU (the same `prepare`; shared memory of
    the op kernel compiled for that launch; paged attention's with one split, bf16 and fp8 pages), its shared
    memory within TensorRT's 48 KB: the op's default pipelining where it fits, fewer stages where not (paged
    attention)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COMPILE_AT_NANO_SHAPES], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 7, done.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="tensorrt is not installed here (no GPU machine): the plugin registrations cannot load")
def test_tensorrt_plugins_register():
    import tensorrt as trt

    from nemo3.plugins.onnx_nodes import NODES, PLUGIN_NAMESPACE, PLUGIN_VERSION
    from nemo3.plugins.tensorrt_plugins import register_plugins

    register_plugins()
    for op_type in NODES:
        assert trt.get_plugin_registry().get_creator(op_type, PLUGIN_VERSION, PLUGIN_NAMESPACE), op_type
