"""The tensorrt target (engines/executors/onnx_export.py, tensorrt_folder.py, the pipeline's `tensorrt` stage): the
step graphs as ONNX, run in onnx's reference evaluator (nemo3 nodes through the plugins' references, TensorRT's
quantization nodes by their semantics) against the torch executor, for the built-in model's bf16, fp8 and nvfp4
builds (the model runs in fp32 on CPU); a --tp 2 build's rank graphs: tests/test_tensorrt_onnx_tp.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from nemo3.engines.executors.onnx_validate import check_graph  # noqa: E402
from nemo3.engines.executors.step_export import pool_fields  # noqa: E402
from nemo3.engines.executors.tensorrt_folder import (TensorRTTarget, read_manifest,  # noqa: E402
                                                     validate_tensorrt_folder, write_tensorrt_folder)
from nemo3.engines.network.loading import load  # noqa: E402
from nemo3.export.build_folder import BuildFolder, model_folder  # noqa: E402
from nemo3.pipeline import BuildOptions, run_stages  # noqa: E402
from nemo3.plugins.onnx_nodes import DOMAIN, NODES  # noqa: E402

pytestmark = pytest.mark.timeout(1800)
ROWS, LENGTH, PREFILL = 2, 32, 16
# decode, a prefill chunk (slot 0 starts its sequence in it, slot 1 continues with fewer tokens), a greedy
# speculative step of 2 drafts (row 0's accepted, row 1's random); the bf16 build also the sampling speculative step
TARGET = TensorRTTarget(ROWS, LENGTH, 3, (PREFILL,), sampling=False)


def options(out, precision: str) -> BuildOptions:
    return BuildOptions(output=out, precision=precision, target="tensorrt", calib_samples=4, calib_seq_len=32,
                        engine_max_sequences=ROWS, engine_max_length=LENGTH, engine_prefill_tokens=(PREFILL,))


@pytest.fixture(scope="module")
def bf16_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "bf16"
    logs = []
    record = run_stages(options(out, "bf16"), ["quantize", "tensorrt"], log=logs.append)
    assert record["stages"]["tensorrt"]["graphs"] == 4, logs  # decode, prefill, speculative greedy and sampling
    if importlib.util.find_spec("tensorrt") is None:  # (where it is, the stage builds the plans)
        assert any("tensorrt_build" in line and "must be built where" in line for line in logs), logs
    return out


def test_bf16_build_graphs_equal_the_torch_executor(bf16_build):
    """Every graph of the stage's folder: checker, plugin attributes, and every output (logits, hidden, the
    speculative steps' tokens, each updated pool) equals the torch executor's to fp32 rounding. The sampling
    speculative step takes the uniforms, sampling parameters and draft distributions as inputs (no random node:
    its sampled tokens equal the executor's for the same uniforms) and returns the updated draft distributions."""
    folder = BuildFolder(bf16_build).tensorrt
    manifest = read_manifest(folder)
    results = validate_tensorrt_folder(load(model_folder(bf16_build)), folder, log=lambda line: None)
    assert len(results) == 4
    for graph in manifest["graphs"]:
        outputs = results[graph["file"]]
        assert set(outputs) == set(graph["outputs"]) | ({"logits"} if graph["step"] != "speculative_step" else set())
        assert graph["aliased"] and all(graph["aliased"][name] in graph["inputs"] for name in graph["aliased"])
    verify = next(g for g in manifest["graphs"] if g["step"] == "speculative_step")
    assert {"mamba2_state_update_steps", "causal_conv1d_update_steps", "latent_moe_route",
            "paged_attention"} <= set(verify["plugins"])
    assert "pages.table" in verify["inputs"] and "pages.table" not in verify["aliased"].values()
    assert not verify["sampling"] and "uniforms" not in verify["inputs"]
    sampled = next(g for g in manifest["graphs"] if g["sampling"])
    assert {"uniforms", "temperature", "top_k", "top_p"} <= set(sampled["inputs"])
    assert sampled["aliased"]["draft_probs.out"] == "draft_probs" and sampled["file"].endswith("sampling_r2_t3.onnx")
    proto = onnx.load(str(folder / sampled["file"]))
    assert not {n.op_type for n in proto.graph.node} & {"RandomUniform", "RandomUniformLike", "Multinomial"}


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_quantized_graphs_equal_the_torch_executor(tmp_path, precision):
    """fp8: FLOAT8E4M3FN weights with DequantizeLinear, activations through QuantizeLinear/DequantizeLinear; nvfp4:
    FLOAT4E2M1 weights with two DequantizeLinear and trt::TRT_FP4DynamicQuantize activations; decode, prefill and
    speculative graphs equal the torch executor's outputs."""
    out = tmp_path / precision
    run_stages(options(out, precision), ["quantize"], log=lambda line: None)
    model = load(model_folder(out))
    folder = tmp_path / "tensorrt"
    write_tensorrt_folder([model], folder, TARGET, log=lambda line: None)
    proto = onnx.load(str(folder / read_manifest(folder)["graphs"][0]["file"]))
    types = {onnx.TensorProto.DataType.Name(init.data_type) for init in proto.graph.initializer}
    ops = {(node.domain, node.op_type) for node in proto.graph.node}
    assert ("", "DequantizeLinear") in ops and ("", "QuantizeLinear") in ops and "FLOAT8E4M3FN" in types
    if precision == "nvfp4":
        assert "FLOAT4E2M1" in types and ("trt", "TRT_FP4DynamicQuantize") in ops
    results = validate_tensorrt_folder(model, folder, log=lambda line: None)
    assert len(results) == 3


def test_plugin_nodes_carry_the_plugin_attributes(bf16_build):
    """Each nemo3 node: a known op_type, plugin_namespace/plugin_version and its scalar attributes; no local function
    shadows a plugin; the checker passes; a node stripped of its attributes is reported."""
    folder = BuildFolder(bf16_build).tensorrt
    proto = onnx.load(str(folder / read_manifest(folder)["graphs"][0]["file"]))
    nodes = [node for node in proto.graph.node if node.domain == DOMAIN]
    assert {node.op_type for node in nodes} == {"mamba2_state_update", "causal_conv1d_update", "latent_moe_route",
                                                "paged_attention"}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"nemo3" and attrs["plugin_version"] == b"1"
        assert set(NODES[node.op_type].attributes) <= set(attrs)
    assert not {f.name for f in proto.functions} & set(NODES)
    assert check_graph(proto) == []
    del nodes[0].attribute[:]
    assert any("plugin attributes" in problem for problem in check_graph(proto))


def test_validate_onnx_cli(bf16_build):
    from click.testing import CliRunner
    from nemo3.cli.validate_onnx import command

    result = CliRunner().invoke(command, [str(bf16_build)])
    assert result.exit_code == 0, result.output
    assert "4 graphs equal the torch executor" in result.output


def test_tensorrt_build_needs_tensorrt(bf16_build):
    """Engines are built only where TensorRT is installed: a clear error here, plans there."""
    from nemo3.engines.executors.tensorrt_build import build_plans

    folder = BuildFolder(bf16_build).tensorrt
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="TensorRT is not installed here"):
            build_plans(folder)
        pytest.skip("tensorrt is not installed: engines are not built here")
    plans = build_plans(folder)
    assert len(plans) == len(json.loads((folder / "manifest.json").read_text())["graphs"])


def _graph_calls(model, manifest, state):
    """(manifest entry, step function, padding-row arguments of its shape) for every graph."""
    from nemo3.engines.executors.compiled_step import CompiledSteps
    from nemo3.engines.executors.step_export import StepShape, example_inputs, step_function

    steps = CompiledSteps(model, state, (PREFILL,))
    for graph in manifest["graphs"]:
        shape = StepShape(graph["step"], graph["tokens"], graph["sampling"])
        yield graph, step_function(shape), example_inputs(steps, shape)


def test_tensorrt_executor_binds_every_graph_tensor(bf16_build):
    """The TensorRT executor's binding plan, from each ONNX graph's inputs and outputs: a call finds its graph by
    (step, tokens, arguments passed: greedy and sampling speculative steps apart, a min_tokens ban in none); every
    input is the executor's own tensor (step arguments, the block table, each pool), every updated pool is bound
    to its input's memory, `out` is new, each with the graph's shape and dtype; an executor of another max_length
    (a wider block table) is refused naming the tensor."""
    from nemo3.engines.executors.tensorrt_executor import bind, call_key, graph_key, onnx_io
    from nemo3.engines.executors.torch_executor import TorchExecutor

    folder = BuildFolder(bf16_build).tensorrt
    manifest, model = read_manifest(folder), load(model_folder(bf16_build))
    keys = [graph_key(graph) for graph in manifest["graphs"]]
    assert len(set(keys)) == 4
    executor = TorchExecutor(model, ROWS, LENGTH, compile=False)  # (TensorRTExecutor's state)
    pools = {id(getattr(entry, attr)) for _, entry, attr in pool_fields(executor.state)}
    for graph, fn, args in _graph_calls(model, manifest, executor.state):
        assert call_key(fn, args) == graph_key(graph)
        if graph["step"] == "speculative_step":  # a banned token: no graph (the step runs eagerly)
            banned = list(args[:-1]) + [args[0].new_zeros(ROWS, 3, model.spec.vocab_size, dtype=bool)]
            assert call_key(fn, banned) not in keys
        io = onnx_io(onnx.load(str(folder / graph["file"])))
        tensors = bind(graph, executor.state, fn, args, io)
        assert set(tensors) == set(graph["inputs"]) | set(graph["outputs"])
        assert tensors["pages.table"] is executor.state.pages.table
        assert {id(tensors[name]) for name in graph["inputs"] if name not in ("draft_probs",)} >= pools
        for output, source in graph["aliased"].items():
            assert tensors[output].data_ptr() == tensors[source].data_ptr()
        assert tuple(tensors["out"].shape) == io["out"][0]
    wider = TorchExecutor(model, ROWS, 4 * LENGTH, compile=False)  # (2 pages per row, not 1)
    graph, fn, args = next(_graph_calls(model, manifest, wider.state))
    with pytest.raises(ValueError, match=f"{graph['file']}: pages.table is"):
        bind(graph, wider.state, fn, args, onnx_io(onnx.load(str(folder / graph["file"]))))


def test_tensorrt_profile_shapes(bf16_build):
    """The engines' input shapes are the runtime's: static graphs give min = opt = max = the graph's shape; a
    dynamic block-table width ranges over 1 .. the table's pages; another dynamic dimension is refused."""
    from nemo3.engines.executors.tensorrt_build import profile_shapes
    from nemo3.engines.executors.tensorrt_executor import onnx_io
    from nemo3.export.kv_pages import pages_for

    folder = BuildFolder(bf16_build).tensorrt
    graph = read_manifest(folder)["graphs"][0]
    inputs = {name: shape for name, (shape, _) in onnx_io(onnx.load(str(folder / graph["file"]))).items()
              if name in graph["inputs"]}
    shapes = profile_shapes(inputs, graph)
    assert all(low == opt == high == inputs[name] for name, (low, opt, high) in shapes.items())
    assert inputs["pages.table"] == (ROWS, pages_for(LENGTH))
    longer = dict(graph, max_length=4 * 64)  # (4 pages of the default 64 tokens per row)
    dynamic = profile_shapes({**inputs, "pages.table": (ROWS, -1)}, longer)
    assert dynamic["pages.table"] == ((ROWS, 1), (ROWS, 4), (ROWS, 4))
    with pytest.raises(ValueError, match="input ids has a dynamic dimension 0"):
        profile_shapes({**inputs, "ids": ("rows", 1)}, graph)


def test_tensorrt_executor_needs_built_engines(bf16_build):
    """Without .plan files a build serves with the torch executor; asking for its engines names the command that
    builds them where TensorRT is installed."""
    from nemo3.engines.runtime.factory import StackOptions, open_scheduler

    scheduler = open_scheduler(bf16_build, StackOptions(max_sequences=ROWS, max_length=LENGTH))
    assert scheduler.executor.kind in ("eager", "compiled")
    with pytest.raises(FileNotFoundError, match="no TensorRT engine; .*tensorrt_build"):
        open_scheduler(bf16_build, StackOptions(engines=True))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="tensorrt is not installed or no CUDA device here: engines cannot be built or run")
def test_tensorrt_executor_generates_what_the_torch_executor_does(bf16_build):
    """On a GPU with TensorRT: the engines built, greedy text (MTP k=2 and k=0) equals the torch executor's."""
    from nemo3.engines.executors.tensorrt_build import build_plans
    from nemo3.engines.runtime.factory import StackOptions, open_scheduler
    from nemo3.engines.runtime.requests import GenerationParams

    folder = BuildFolder(bf16_build).tensorrt
    build_plans(folder)
    dtype = getattr(torch, read_manifest(folder)["dtype"])  # (the activations the graphs were exported with)
    params = GenerationParams(max_tokens=12, temperature=0.0)
    texts = {}
    for engines in (True, False):
        for k in (0, 2):
            scheduler = open_scheduler(bf16_build, StackOptions(device="cuda", dtype=dtype, engines=engines,
                                                                compile=False, num_speculative_tokens=k))
            assert (scheduler.executor.kind == "tensorrt") == engines
            texts[engines, k] = "".join(d.text for d in scheduler.stream("The capital of", params))
    assert texts[True, 0] == texts[False, 0] == texts[True, 2] == texts[False, 2]


class ReferenceEngine:
    """A step graph run in onnx's reference evaluator on the tensors the TensorRT executor binds, its outputs
    written into them (each updated pool into its input's memory): the engine's contract, on CPU."""

    def __init__(self, graph, proto):
        from nemo3.engines.executors.onnx_validate import evaluator
        from nemo3.engines.executors.tensorrt_executor import onnx_io

        self.graph, self.io, self.session, self.runs = graph, onnx_io(proto), evaluator(proto), 0
        self.inputs, self.outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]

    def run(self, state, fn, args):
        from nemo3.engines.executors.tensorrt_executor import bind
        from nemo3.plugins.onnx_reference_ops import to_numpy, to_torch

        tensors = bind(self.graph, state, fn, args, self.io)
        results = self.session.run(None, {name: to_numpy(tensors[name]) for name in self.inputs})
        for name, value in zip(self.outputs, results):
            tensors[name].copy_(to_torch(value).reshape(tensors[name].shape))
        self.runs += 1
        return tensors["out"]


def test_graph_steps_serve_what_the_torch_executor_does(bf16_build):
    """The TensorRT executor's steps (GraphSteps) with each graph run by the reference evaluator through the
    executor's bindings: a greedy and a sampled request with MTP k=2 (prefill chunk, greedy and sampling
    speculative graphs) and a request without MTP (decode graph) give the eager torch executor's tokens."""
    from nemo3.engines.executors.tensorrt_executor import GraphSteps, graph_key
    from nemo3.engines.executors.torch_executor import TorchExecutor
    from nemo3.engines.runtime.requests import GenerationParams
    from nemo3.engines.runtime.scheduler import Scheduler

    folder = BuildFolder(bf16_build).tensorrt
    graphs, model = read_manifest(folder)["graphs"], load(model_folder(bf16_build))
    engines = {graph_key(g): ReferenceEngine(g, onnx.load(str(folder / g["file"]))) for g in graphs}
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.spec.vocab_size, (n,), generator=g).tolist() for n in (11, 5)]
    runs = {2: [GenerationParams(max_tokens=9, ignore_eos=True),  # (its last steps alone: the greedy graph)
                GenerationParams(max_tokens=5, ignore_eos=True, temperature=0.8, top_p=0.9, seed=7)],
            0: [GenerationParams(max_tokens=3, ignore_eos=True)]}
    for k, params in runs.items():
        tokens = []
        for graph_steps in (False, True):
            executor = TorchExecutor(model, ROWS, LENGTH, compile=False)
            if graph_steps:
                executor.compiled = GraphSteps(model, executor.state, graphs, engines)
            completions = Scheduler(executor, num_speculative_tokens=k).generate(prompts[:len(params)], params)
            tokens.append([c.token_ids for c in completions])
        assert tokens[0] == tokens[1], (k, tokens)
    assert all(engine.runs for engine in engines.values()), {e.graph["file"]: e.runs for e in engines.values()}
