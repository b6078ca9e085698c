"""The executor of a --target tensorrt build's engines (`OUT/engines/tensorrt/rank0/<graph>.plan`, tensorrt_build.py).

`TensorRTExecutor` is the torch executor whose decode, prefill-chunk and speculative calls (padded to the graphs'
max_sequences rows) run the engine of their step graph (tensorrt_folder.py's manifest), as AOTExecutor runs AOTInductor
packages; the MTP pass over a prompt stays eager. `GraphSteps` matches a call to a graph by `call_key` (step, tokens
per row, the step arguments it passes: a sampled speculative step passes uniforms and draft_probs, a greedy one not);
a call no graph covers (a min_tokens ban, another draft length) runs the step eagerly.

Each engine's tensors are bound by name (`bind`): the step's arguments, the block table (whole: the graphs read every
column, as CUDA steps do) and every state pool are the executor's own tensors; each updated pool `<name>.out` is bound
to the memory of its input `<name>` (updated in place, as Torch-TensorRT binds an engine output aliased to an input),
and `out` to a new tensor. Shapes and dtypes are checked against the engine's (or, on CPU, the ONNX graph's) I/O.
`tensorrt` is imported only when engines are loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import compiled_step
from .compiled_step import CompiledSteps
from .step_export import TABLE, argument_names, pool_fields
from .tensorrt_build import import_tensorrt
from .tensorrt_folder import build_command, read_manifest
from .torch_executor import TorchExecutor

WHERE = "engines/executors/tensorrt_executor.py"
OUT = "out"


def graph_key(graph: dict) -> tuple:
    """(step, tokens per row, the step's arguments the graph takes) of a manifest entry."""
    return graph["step"], graph["tokens"], tuple(name for name in graph["inputs"] if name in _parameters(graph["step"]))


def call_key(fn, args) -> tuple:
    """The graph_key a call of step function `fn` with `args` (None: not passed) needs."""
    return fn.__name__, args[0].shape[1], tuple(argument_names(fn, list(args)))


def _parameters(step: str) -> list[str]:
    import inspect

    return list(inspect.signature(getattr(compiled_step, step)).parameters)[1:]


def bind(graph: dict, state, fn, args, io: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """{tensor name: tensor} for every input and output of manifest entry `graph` on a call of `fn` with `args` over
    `state` (module docstring); `io`: each name's (shape, dtype) in the engine. A tensor of another shape or dtype, or
    a name the executor has no tensor for: ValueError naming the graph and the tensor."""
    given = dict(zip(argument_names(fn, list(args)), (a for a in args if a is not None)))
    given[TABLE] = state.pages.table
    given.update({name: getattr(entry, attr) for name, entry, attr in pool_fields(state)})
    tensors = {}
    for name in graph["inputs"]:
        if name not in given:
            raise ValueError(f"{graph['file']}: input {name} is neither a step argument, the block table nor a pool "
                             "of the executor's state")
        tensors[name] = given[name]
    for name in graph["outputs"]:
        if name in graph["aliased"]:
            tensors[name] = tensors[graph["aliased"][name]]
        elif name == OUT:
            shape, dtype = io[name]
            tensors[name] = torch.empty(shape, dtype=dtype, device=state.pages.table.device)
        else:
            raise ValueError(f"{graph['file']}: output {name} is neither {OUT} nor aliased to an input")
    for name, tensor in tensors.items():
        shape, dtype = io[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"{graph['file']}: {name} is {list(shape)} {dtype} in the engine, the executor's tensor "
                             f"{list(tensor.shape)} {tensor.dtype}{'' if tensor.is_contiguous() else ' (strided)'}")
    return tensors


ONNX_DTYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "INT64": torch.int64,
               "INT32": torch.int32, "BOOL": torch.bool, "UINT8": torch.uint8, "FLOAT8E4M3FN": torch.float8_e4m3fn}


def onnx_io(proto) -> dict[str, tuple[tuple[int | str, ...], torch.dtype]]:
    """{name: (shape, dtype)} of an ONNX graph's inputs and outputs (a dynamic dimension: its name)."""
    import onnx

    io = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
        io[value.name] = (shape, ONNX_DTYPES[onnx.TensorProto.DataType.Name(tensor.elem_type)])
    return io


class EngineCall:
    """One step graph's engine and execution context."""

    def __init__(self, runtime, graph: dict, plan: Path):
        trt = import_tensorrt()
        self.graph = graph
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan}: TensorRT could not deserialize the engine (built by another TensorRT "
                               f"version or for another GPU?): rebuild it with `{build_command(plan.parents[1])}`")
        self.context = self.engine.create_execution_context()
        kinds = trt.DataType
        dtypes = {kinds.FLOAT: torch.float32, kinds.HALF: torch.float16, kinds.BF16: torch.bfloat16,
                  kinds.INT64: torch.int64, kinds.INT32: torch.int32, kinds.BOOL: torch.bool, kinds.UINT8: torch.uint8,
                  kinds.FP8: torch.float8_e4m3fn}
        self.io = {name: (tuple(self.engine.get_tensor_shape(name)), dtypes[self.engine.get_tensor_dtype(name)])
                   for name in [*graph["inputs"], *graph["outputs"]]}

    def run(self, state, fn, args) -> torch.Tensor:
        tensors = bind(self.graph, state, fn, args, self.io)
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.graph['file']}: TensorRT could not run the engine (see its log)")
        return tensors[OUT]


def load_engines(folder: Path, graphs: list[dict]) -> dict[tuple, EngineCall]:
    """{graph_key: EngineCall} of every graph's .plan in `folder`."""
    trt = import_tensorrt()
    from ...plugins.tensorrt_plugins import register_plugins

    register_plugins()  # (the engines' plugin creators, found by name when they are deserialized)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    return {graph_key(g): EngineCall(runtime, g, plan_path(folder, g)) for g in graphs}


class GraphSteps(CompiledSteps):
    """CompiledSteps whose call of a step function runs its graph's engine (`calls`: graph_key -> an object whose
    `run(state, fn, args)` returns `out`), or the step eagerly when no graph covers the call."""

    def __init__(self, model, state, graphs: list[dict], calls: dict):
        super().__init__(model, state, tuple(g["tokens"] for g in graphs if g["step"] == "prefill_step"))
        self.calls = calls

    def read_pages(self, tokens: int) -> None:
        self.state.pages.bound = self.state.pages.table.shape[1]  # (the graphs read the whole block table)

    def _call(self, fn, *args) -> torch.Tensor:
        call = self.calls.get(call_key(fn, args))
        return fn(self, *args) if call is None else call.run(self.state, fn, args)

    def warm_up(self, max_tokens: int) -> None:
        """Nothing to compile."""


def plan_path(folder: Path, graph: dict) -> Path:
    return Path(folder) / Path(graph["file"]).with_suffix(".plan")


class TensorRTExecutor(TorchExecutor):
    kind = "tensorrt"

    def __init__(self, model, folder: str | Path):
        folder = Path(folder)
        manifest = read_manifest(folder)
        graphs = manifest["graphs"]
        missing = [str(plan_path(folder, g)) for g in graphs if not plan_path(folder, g).is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no TensorRT engine; build the engines where TensorRT is installed: "
                                    f"`{build_command(folder)}`")
        if model.device.type != "cuda":
            raise ValueError(f"{folder}: TensorRT engines run on a CUDA device; the model is on {model.device}")
        if str(model.dtype).removeprefix("torch.") != manifest["dtype"]:
            raise ValueError(f"{folder}: engines built for {manifest['dtype']} activations, the model runs "
                             f"{model.dtype}")
        super().__init__(model, graphs[0]["rows"], graphs[0]["max_length"], compile=False)
        self.compiled = GraphSteps(model, self.state, graphs, load_engines(folder, graphs))
