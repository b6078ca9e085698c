"""The quantized formats as custom ops, for graphs that must keep them as quantization nodes (ONNX export:
quant/onnx_nodes.py translates each to TensorRT's nodes). Each op computes exactly what quant/fp8.py and
quant/nvfp4.py compute; QuantLinear calls them under plugins/dispatch.functional_ops instead of the plain functions.
"""

from __future__ import annotations

import torch

from . import fp8, nvfp4


@torch.library.custom_op("nemo3::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8.fake_quantize: an activation or K/V output through E4M3 with its static scale."""
    return fp8.fake_quantize(x, scale)


@torch.library.custom_op("nemo3::fp8_dequantize_weight", mutates_args=())
def fp8_dequantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8.dequantize to float32: weight float8_e4m3fn [out, in], scale fp32 scalar."""
    return fp8.dequantize(weight, scale, torch.float32)


@torch.library.custom_op("nemo3::nvfp4_qdq", mutates_args=())
def nvfp4_qdq(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """nvfp4.fake_quantize: an activation through NVFP4 with dynamic block scales and its static global scale."""
    return nvfp4.fake_quantize(x, global_scale)


@torch.library.custom_op("nemo3::nvfp4_dequantize_weight", mutates_args=())
def nvfp4_dequantize_weight(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor
                            ) -> torch.Tensor:
    """nvfp4.dequantize to float32: packed codes uint8 [out, in/2], block_scale E4M3 [out, in/16], fp32 scalar."""
    return nvfp4.dequantize(packed, block_scale, global_scale, torch.float32)


@fp8_qdq.register_fake
def _(x, scale):
    return torch.empty_like(x)


@nvfp4_qdq.register_fake
def _(x, global_scale):
    return torch.empty_like(x)


@fp8_dequantize_weight.register_fake
def _(weight, scale):
    return weight.new_empty(weight.shape, dtype=torch.float32)


@nvfp4_dequantize_weight.register_fake
def _(packed, block_scale, global_scale):
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
