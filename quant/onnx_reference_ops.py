"""TensorRT's quantization node `trt::TRT_FP4DynamicQuantize` for `onnx.reference.ReferenceEvaluator`, by its
documented semantics (QuantizeLinear/DequantizeLinear, FLOAT8E4M3FN and FLOAT4E2M1 included, are onnx's own):

    per block of `block_size` values along `axis`, with the global scale g (input 1):
    block scale s = E4M3(min(amax(|block|) / (6 g), 448))          (output 1, FLOAT8E4M3FN)
    values      = E2M1(x / (s g)), round to nearest even, saturating  (output 0, FLOAT4E2M1; 0 where s g == 0)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx.reference.op_run import OpRun

from .nvfp4 import E2M1_MAX, E4M3_MAX
from .onnx_nodes import TRT_DOMAIN


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the class name is the op_type)
    op_domain = TRT_DOMAIN

    def _run(self, x, global_scale, axis=-1, block_size=16, scale_type=17):
        moved = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
        blocks = moved.reshape(*moved.shape[:-1], -1, block_size)
        g = np.float32(np.asarray(global_scale, dtype=np.float32).reshape(()))
        amax = np.abs(blocks).max(axis=-1, keepdims=True)
        scale = np.minimum(amax / (np.float32(E2M1_MAX) * g), np.float32(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)
        step = scale.astype(np.float32) * g
        scaled = np.divide(blocks, step, out=np.zeros_like(blocks), where=step != 0)
        values = np.clip(scaled, -E2M1_MAX, E2M1_MAX).astype(ml_dtypes.float4_e2m1fn)
        values = np.moveaxis(values.reshape(moved.shape), -1, axis)
        return values, np.moveaxis(scale[..., 0], -1, axis)


QUANT_OPS = [TRT_FP4DynamicQuantize]
