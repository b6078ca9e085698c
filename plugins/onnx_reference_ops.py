"""The nemo3 nodes (plugins/onnx_nodes.py) for `onnx.reference.ReferenceEvaluator(new_ops=NEMO3_OPS)`: each runs
the plugin's plain-torch reference, so the evaluator executes an exported graph on CPU exactly as the plugins
specify it. A node's aliased outputs are the updated copies of its inputs (the inputs are not modified)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from onnx.reference.op_run import OpRun

from .causal_conv1d_update import causal_conv1d_update_reference
from .latent_moe_route import latent_moe_route_reference
from .mamba2_state_update import mamba2_state_update_reference
from .onnx_nodes import DOMAIN
from .paged_attention import paged_attention_reference


FP8 = (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn)  # (numpy has no float8: onnx uses ml_dtypes' type)


def to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.array(array, copy=True)
    if array.dtype == FP8[1]:
        return torch.from_numpy(array.view(np.uint8)).view(FP8[0])
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == FP8[0]:
        return tensor.view(torch.uint8).numpy().view(FP8[1])
    return tensor.numpy()


def _mamba2(inputs, steps, dt_softplus, dt_min, dt_max):
    state_pool, x, dt, A, B, C, D, dt_bias, slots = map(to_torch, inputs)
    y = mamba2_state_update_reference(state_pool, x, dt, A, B, C, D, dt_bias, slots, None, bool(dt_softplus),
                                      (dt_min, dt_max), steps)
    return (to_numpy(y), to_numpy(state_pool)) + (() if steps is None else (to_numpy(steps),))


def _conv(inputs, steps, silu):
    x, conv_pool, weight, bias, slots = map(to_torch, inputs)
    out = causal_conv1d_update_reference(x, conv_pool, weight, bias, slots, "silu" if silu else None, steps)
    return (to_numpy(out), to_numpy(conv_pool)) + (() if steps is None else (to_numpy(steps),))


class mamba2_state_update(OpRun):  # noqa: N801 (class names are the op_types)
    op_domain = DOMAIN

    def _run(self, *inputs, plugin_namespace=None, plugin_version=None, dt_softplus=1, dt_min=0.0, dt_max=0.0):
        return _mamba2(inputs, None, dt_softplus, dt_min, dt_max)


class mamba2_state_update_steps(OpRun):  # noqa: N801
    op_domain = DOMAIN

    def _run(self, *inputs, plugin_namespace=None, plugin_version=None, dt_softplus=1, dt_min=0.0, dt_max=0.0):
        return _mamba2(inputs[:-1], to_torch(inputs[-1]), dt_softplus, dt_min, dt_max)


class causal_conv1d_update(OpRun):  # noqa: N801
    op_domain = DOMAIN

    def _run(self, *inputs, plugin_namespace=None, plugin_version=None, silu=1):
        return _conv(inputs, None, silu)


class causal_conv1d_update_steps(OpRun):  # noqa: N801
    op_domain = DOMAIN

    def _run(self, *inputs, plugin_namespace=None, plugin_version=None, silu=1):
        return _conv(inputs[:-1], to_torch(inputs[-1]), silu)


class latent_moe_route(OpRun):  # noqa: N801
    op_domain = DOMAIN

    def _run(self, router_logits, correction_bias, plugin_namespace=None, plugin_version=None, top_k=1, n_group=1,
             topk_group=1, norm_topk_prob=1, routed_scaling_factor=1.0):
        weights, ids = latent_moe_route_reference(to_torch(router_logits), to_torch(correction_bias), top_k, n_group,
                                                  topk_group, bool(norm_topk_prob), routed_scaling_factor)
        return to_numpy(weights), to_numpy(ids)


class paged_attention(OpRun):  # noqa: N801
    op_domain = DOMAIN

    def _run(self, *inputs, plugin_namespace=None, plugin_version=None, scale=1.0, max_pages=-1):
        out = paged_attention_reference(*map(to_torch, inputs[:5]), scale, *map(to_torch, inputs[5:]),
                                        max_pages=None if max_pages < 0 else max_pages)
        return (to_numpy(out),)


class paged_attention_fp8(paged_attention):  # noqa: N801 (k_scale, v_scale: two more inputs)
    pass


NEMO3_OPS = [paged_attention, paged_attention_fp8, mamba2_state_update, mamba2_state_update_steps, causal_conv1d_update, causal_conv1d_update_steps,
             latent_moe_route]
