"""The quantized formats as TensorRT's ONNX quantization nodes, as ModelOpt's ONNX export writes them
(modelopt/torch/quantization/export_onnx.py), for the custom ops of quant/qdq_ops.py:

    FP8 activation / K/V output   QuantizeLinear(x, scale, output_dtype=FLOAT8E4M3FN) -> DequantizeLinear(q, scale)
    FP8 weight                    FLOAT8E4M3FN initializer -> DequantizeLinear(w, scale)
    NVFP4 weight                  FLOAT4E2M1 initializer [out, in] -> DequantizeLinear(block scales E4M3, global
                                  scale) -> DequantizeLinear(w, block scales, axis=-1, block_size=16)
    NVFP4 activation              trt::TRT_FP4DynamicQuantize(x, global scale, axis=-1, block_size=16,
                                  scale_type=FLOAT8E4M3FN) -> (x FLOAT4E2M1, block scales E4M3), then the two
                                  DequantizeLinear as for a weight

torch stores an NVFP4 weight as packed uint8 bytes; `retype_fp4_weights(proto)` turns each such initializer that
feeds a blocked DequantizeLinear into the FLOAT4E2M1 tensor it is (same bytes: element 2j in the low nibble).
"""

from __future__ import annotations

from .nvfp4 import BLOCK

TRT_DOMAIN = "trt"
FLOAT8E4M3FN, FLOAT4E2M1 = 17, 23  # onnx.TensorProto data types


def register_schemas() -> None:
    """Register trt::TRT_FP4DynamicQuantize with onnx (once per process), for the checker."""
    import onnx

    if onnx.defs.has("TRT_FP4DynamicQuantize", TRT_DOMAIN):
        return
    schema = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    onnx.defs.register_schema(schema(
        "TRT_FP4DynamicQuantize", TRT_DOMAIN, 1,
        inputs=[schema.FormalParameter("x", "T"), schema.FormalParameter("global_scale", "S")],
        outputs=[schema.FormalParameter("values", "Q"), schema.FormalParameter("block_scales", "B")],
        type_constraints=[("T", floats, "input"), ("S", floats, "scale"), ("Q", ["tensor(float4e2m1)"], "values"),
                          ("B", ["tensor(float8e4m3fn)"], "block scales")],
        attributes=[schema.Attribute(name, schema.AttrType.INT, name) for name in ("axis", "block_size", "scale_type")],
        doc="TensorRT's dynamic NVFP4 quantization"))


def quant_translation_table() -> dict:
    """torch op (quant/qdq_ops.py) -> onnxscript function emitting TensorRT's quantization nodes."""
    import onnxscript
    import torch

    from . import qdq_ops  # noqa: F401 (registers the ops)

    register_schemas()
    op = onnxscript.opset23
    trt = onnxscript.values.Opset(TRT_DOMAIN, 1)

    def fp8_qdq(x, scale):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, output_dtype=FLOAT8E4M3FN), scale)

    def fp8_weight(weight, scale):
        return op.DequantizeLinear(weight, scale)

    def nvfp4_blocks(values, block_scale, global_scale):
        return op.DequantizeLinear(values, op.DequantizeLinear(block_scale, global_scale), axis=-1, block_size=BLOCK)

    def nvfp4_weight(packed, block_scale, global_scale):
        return nvfp4_blocks(packed, block_scale, global_scale)

    def nvfp4_qdq(x, global_scale):
        values, block_scale = trt.TRT_FP4DynamicQuantize(x, global_scale, axis=-1, block_size=BLOCK,
                                                          scale_type=FLOAT8E4M3FN, _num_outputs=2)
        return nvfp4_blocks(values, block_scale, global_scale)

    ops = torch.ops.nemo3
    return {ops.fp8_qdq.default: fp8_qdq, ops.fp8_dequantize_weight.default: fp8_weight,
            ops.nvfp4_qdq.default: nvfp4_qdq, ops.nvfp4_dequantize_weight.default: nvfp4_weight}


def retype_fp4_weights(proto) -> int:
    """Retype the packed-uint8 initializers read by a blocked DequantizeLinear as FLOAT4E2M1 [rows, 2 * bytes];
    returns how many."""
    import onnx

    initializers = {init.name: init for init in proto.graph.initializer}
    done = set()
    for node in proto.graph.node:
        blocked = any(a.name == "block_size" for a in node.attribute)
        init = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" and blocked else None
        if init is None or init.data_type != onnx.TensorProto.UINT8 or init.name in done:
            continue
        raw = onnx.numpy_helper.to_array(init).tobytes()
        init.ClearField("int32_data")
        init.raw_data = raw
        init.data_type = FLOAT4E2M1
        init.dims[-1] *= 2
        done.add(init.name)
    return len(done)
