"""ONNX step graphs for TensorRT: step_export.py's pure `torch.export` programs through `torch.onnx.export`, each
plugin op one `nemo3` node (plugins/onnx_nodes.py), each quantized layer TensorRT's quantization nodes
(quant/onnx_nodes.py).

`write_step_onnx(model, shape, path)` writes one graph; its inputs and outputs are named as step_export.py lists
them (`<layer>.<pool>` in, `<layer>.<pool>.out` out: the aliased pairs).
"""

from __future__ import annotations

from pathlib import Path

from ...plugins.onnx_nodes import DOMAIN, OPSET, translation_table
from ...quant.onnx_nodes import quant_translation_table, retype_fp4_weights
from .step_export import StepShape, export_step, input_names, output_names

ONNX_OPSET = 23  # FLOAT4E2M1 and blocked DequantizeLinear


def write_step_onnx(model, shape: StepShape, path: Path):
    """Export the step graph of `shape` to `path` (weights inside the file); returns the onnx ModelProto."""
    import onnx
    import torch

    program, state = export_step(model, shape)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=ONNX_OPSET,
                                     custom_translation_table={**translation_table(), **quant_translation_table()},
                                     input_names=input_names(state, shape), output_names=output_names(state, shape),
                                     optimize=True, verbose=False)
    proto = onnx_program.model_proto
    retype_fp4_weights(proto)
    if not any(entry.domain == DOMAIN for entry in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return proto
