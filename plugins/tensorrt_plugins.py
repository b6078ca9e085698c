"""The nemo3 nodes (plugins/onnx_nodes.py) as TensorRT quickly-deployable plugins with AOT implementations: the
engine embeds each node's PTX (plugins/tensorrt_kernels.py) and runs without Python. Needs `tensorrt` (imported
here only: call `register_plugins()` before parsing an exported ONNX graph, in the process that builds engines).

Per node `nemo3::<op_type>`: `register` gives the output descriptors (an aliased output is `aliased()` of its
input: the state pools are updated in place; the others have the shapes of the op's fake implementation),
`aot_impl` compiles the kernel for the builder's shapes and dtypes (static: one engine per step shape) and returns
(kernel name, PTX, launch parameters, no extra arguments).
"""

from __future__ import annotations

import inspect
from typing import Tuple

import torch

from .onnx_nodes import NODES, PLUGIN_NAMESPACE
from .tensorrt_kernels import compile_plugin

WHERE = "plugins/tensorrt_plugins.py"
ATTR_TYPES = {"int": int, "float": float}


def _torch_dtype(trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.fp8: torch.float8_e4m3fn}
    return table[dtype]


def _meta_tensor(trt, desc, op_type: str, index: int) -> torch.Tensor:
    shape = []
    for dim in desc.shape_expr:
        if dim.is_fake or not dim.is_constant:
            raise ValueError(f"{WHERE}: nemo3::{op_type} input {index} has a dynamic shape; nemo3 engines have "
                             "static shapes (one per step shape)")
        shape.append(dim.constant_value())
    return torch.empty(shape, dtype=_torch_dtype(trt, desc.dtype), device="meta")


def _outputs(trtp, trt, spec, inputs: list, attrs: dict):
    """Output descriptors: aliased pools, else the op's fake shapes (out/y like x, attention's like q; routing
    [tokens, top_k])."""
    if spec.op_type == "latent_moe_route":
        rows = inputs[0].shape_expr[0]
        return (trtp.from_shape_expr((rows, attrs["top_k"]), dtype=trt.float32),
                trtp.from_shape_expr((rows, attrs["top_k"]), dtype=trt.int32))
    x = inputs[spec.inputs.index("x") if "x" in spec.inputs else 0]  # (attention: out like q)
    return tuple(inputs[spec.aliased[i]].aliased() if i in spec.aliased else x.like()
                 for i in range(len(spec.outputs)))


def _signature(trtp, spec, aot: bool) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, kind, annotation=trtp.TensorDesc) for name in spec.inputs]
    params += [inspect.Parameter(name, kind, annotation=ATTR_TYPES[t]) for name, t in spec.attributes.items()]
    if aot:
        params += [inspect.Parameter("outputs", kind, annotation=Tuple[trtp.TensorDesc]),
                   inspect.Parameter("tactic", kind, annotation=int)]
        return inspect.Signature(params)
    return inspect.Signature(params, return_annotation=Tuple[(trtp.TensorDesc,) * len(spec.outputs)])


def _define(trtp, trt, spec) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{spec.op_type}"

    def describe(*args, **kwargs):
        bound = _signature(trtp, spec, False).bind(*args, **kwargs).arguments
        return _outputs(trtp, trt, spec, [bound[name] for name in spec.inputs],
                        {name: bound[name] for name in spec.attributes})

    def aot(*args, **kwargs):
        bound = _signature(trtp, spec, True).bind(*args, **kwargs).arguments
        inputs = [_meta_tensor(trt, bound[name], spec.op_type, i) for i, name in enumerate(spec.inputs)]
        kernel = compile_plugin(spec.op_type, inputs, {name: bound[name] for name in spec.attributes})
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = kernel.grid
        params.block_x = kernel.block
        params.shared_mem = kernel.shared_mem
        return kernel.name.encode(), kernel.ptx.encode(), params, trtp.SymIntExprs(0)

    for function, aot_side in ((describe, False), (aot, True)):  # (the registry reads the annotations)
        function.__signature__ = _signature(trtp, spec, aot_side)
        function.__annotations__ = {name: p.annotation for name, p in function.__signature__.parameters.items()
                                    if p.annotation is not inspect.Parameter.empty}
        if not aot_side:
            function.__annotations__["return"] = function.__signature__.return_annotation
    trtp.register(plugin_id)(describe)
    trtp.aot_impl(plugin_id)(aot)


def register_plugins() -> None:
    """Register every nemo3 node with TensorRT's plugin registry (once per process)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if getattr(register_plugins, "done", False):
        return
    for spec in NODES.values():
        _define(trtp, trt, spec)
    register_plugins.done = True
