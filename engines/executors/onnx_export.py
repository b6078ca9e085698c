"""ONNX step graphs for TensorRT, from the step programs of step_export.py (the ones the AOT engines compile).

`export_step_onnx(model, shape, rows, max_length, path)` exports `shape` over a fresh state of `rows` slots of
`max_length` tokens (attention reading the whole block table per row) under `plugins.dispatch.functional_ops`: each
plugin op stays one op (a `nemo3` node, plugins/onnx_nodes.py) and the ops that update pools run as functional
variants whose results are copied into the pools, so functionalizing the program (`run_decompositions`) turns every
pool update into an output. Those outputs are made the graph's own (torch.onnx drops input mutations): each updated
pool `<name>.out` is the aliased partner of input `<name>`, then `out` (the step's result). Quantized layers become
TensorRT's quantization nodes (quant/onnx_nodes.py), a tensor-parallel rank's collectives AllReduce/AllGather nodes
(onnx_collectives.py; exported inside a process group of the rank's place, aot_build.stand_in_group).
"""

from __future__ import annotations

from pathlib import Path

from ...plugins.dispatch import functional_ops
from ...plugins.onnx_nodes import DOMAIN, OPSET, translation_table
from ...quant.onnx_nodes import quant_translation_table, retype_fp4_weights
from .onnx_collectives import collective_translations
from .step_export import StepShape, export_step

ONNX_OPSET = 23  # FLOAT4E2M1 and blocked DequantizeLinear


def pure_program(step_program):
    """(program, output names): the step program functionalized, its pool updates as outputs `<input>.out`."""
    import torch.utils._pytree as pytree
    from torch.export.graph_signature import ExportGraphSignature, OutputKind, OutputSpec

    program = step_program.program.run_decompositions({})
    signature = program.graph_signature
    names = dict(zip(signature.user_inputs, step_program.inputs))
    outputs, specs = [], []
    for spec in signature.output_specs:
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            outputs.append(f"{names[spec.target]}.out")
        elif spec.kind == OutputKind.USER_OUTPUT:
            outputs.append("out")
        else:
            raise ValueError(f"engines/executors/onnx_export.py: the step program updates {spec.target} "
                             f"({spec.kind.name}), which an ONNX graph cannot")
        specs.append(OutputSpec(OutputKind.USER_OUTPUT, spec.arg, None))
    program._graph_signature = ExportGraphSignature(signature.input_specs, specs)
    call = program.module_call_graph[0].signature  # the program's own call: now a tuple of every output
    call.out_spec = pytree.tree_flatten(tuple(outputs))[1]
    return program, outputs


def export_step_onnx(model, shape: StepShape, rows: int, max_length: int, path: Path):
    """Write the graph of `shape` to `path` (weights inside); returns (onnx ModelProto, input names, output names)."""
    import onnx
    import torch

    state = model.new_state(rows, max_length, mtp=model.mtp is not None)
    with functional_ops():
        step_program = export_step(model, state, shape, state.pages.table.shape[1])
    program, outputs = pure_program(step_program)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=ONNX_OPSET,
                                     custom_translation_table={**translation_table(), **quant_translation_table(),
                                                               **collective_translations()},
                                     input_names=step_program.inputs, output_names=outputs, optimize=True,
                                     verbose=False)
    proto = onnx_program.model_proto
    retype_fp4_weights(proto)
    if not any(entry.domain == DOMAIN for entry in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return proto, step_program.inputs, outputs
