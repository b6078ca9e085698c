"""The tensorrt target (engines/executors/onnx_export.py, tensorrt_folder.py, the pipeline's `tensorrt` stage): the
step graphs as ONNX, run in onnx's reference evaluator (nemo3 nodes through the plugins' references, TensorRT's
quantization nodes by their semantics) against the torch executor, for the built-in model's bf16, fp8 and nvfp4
builds (the model runs in fp32 on CPU), and a --tp 2 build's per-rank decode graphs run together against tp 1."""

from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from nemo3.engines.executors.onnx_validate import check_graph, compare_ranks  # noqa: E402
from nemo3.engines.executors.tensorrt_folder import (TensorRTTarget, read_manifest,  # noqa: E402
                                                     validate_tensorrt_folder, write_tensorrt_folder)
from nemo3.engines.network.loading import load  # noqa: E402
from nemo3.export.build_folder import BuildFolder, model_folder  # noqa: E402
from nemo3.pipeline import BuildOptions, run_stages  # noqa: E402
from nemo3.plugins.onnx_nodes import DOMAIN, NODES  # noqa: E402

pytestmark = pytest.mark.timeout(1800)
ROWS, LENGTH, PREFILL = 2, 32, 16
# decode, a prefill chunk (slot 0 starts its sequence in it, slot 1 continues with fewer tokens), a greedy
# speculative step of 2 drafts (row 0's accepted, row 1's random)
TARGET = TensorRTTarget(ROWS, LENGTH, 3, (PREFILL,))


def options(out, precision: str) -> BuildOptions:
    return BuildOptions(output=out, precision=precision, target="tensorrt", calib_samples=4, calib_seq_len=32,
                        engine_max_sequences=ROWS, engine_max_length=LENGTH, engine_prefill_tokens=(PREFILL,))


@pytest.fixture(scope="module")
def bf16_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "bf16"
    logs = []
    record = run_stages(options(out, "bf16"), ["quantize", "tensorrt"], log=logs.append)
    assert record["stages"]["tensorrt"]["graphs"] == 3, logs  # decode, prefill, speculative
    assert any("tensorrt_build" in line and "must be built where" in line for line in logs), logs
    return out


def test_bf16_build_graphs_equal_the_torch_executor(bf16_build):
    """Every graph of the stage's folder: checker, plugin attributes, and every output (logits, hidden, the
    speculative step's tokens, each updated pool) equals the torch executor's to fp32 rounding."""
    folder = BuildFolder(bf16_build).tensorrt
    manifest = read_manifest(folder)
    results = validate_tensorrt_folder(load(model_folder(bf16_build)), folder, log=lambda line: None)
    assert len(results) == 3
    for graph in manifest["graphs"]:
        outputs = results[graph["file"]]
        assert set(outputs) == set(graph["outputs"]) | ({"logits"} if graph["step"] != "speculative_step" else set())
        assert graph["aliased"] and all(graph["aliased"][name] in graph["inputs"] for name in graph["aliased"])
    verify = next(g for g in manifest["graphs"] if g["step"] == "speculative_step")
    assert {"mamba2_state_update_steps", "causal_conv1d_update_steps", "latent_moe_route",
            "paged_attention"} <= set(verify["plugins"])
    assert "pages.table" in verify["inputs"] and "pages.table" not in verify["aliased"].values()


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
    assert "3 graphs equal the torch executor" in result.output


@pytest.fixture(scope="module")
def tp2_build(tmp_path_factory):
    """A --tp 2 --moe-parallel tp build's decode graphs, one per rank."""
    out = tmp_path_factory.mktemp("trt") / "tp2"
    options = BuildOptions(output=out, precision="bf16", target="tensorrt", tp=2, moe_parallel="tp",
                           engine_max_sequences=ROWS, engine_max_length=LENGTH, engine_prefill_tokens=(), engine_mtp=0)
    logs = []
    record = run_stages(options, ["quantize", "shard", "tensorrt"], log=logs.append)
    assert record["stages"]["tensorrt"]["graphs"] == 2, logs
    return out


def test_tp2_rank_graphs_run_together_give_the_tp1_executor(tp2_build):
    """Each rank's decode graph holds its all-reduces as AllReduce nodes with the plugin attributes and passes the
    checker; the two ranks' graphs, run together in the reference evaluator (two calls from fresh slots, the second
    reading the pools the first wrote), give the tp 1 torch executor's hidden states and logits; rank 0's graph in
    both places does not."""
    folder = BuildFolder(tp2_build).tensorrt
    manifest = read_manifest(folder)
    assert manifest["tp"] == 2
    assert [(g["rank"], g["file"]) for g in manifest["graphs"]] == [(0, "rank0/backbone_r2_t1.onnx"),
                                                                   (1, "rank1/backbone_r2_t1.onnx")]
    protos = [onnx.load(str(folder / g["file"])) for g in manifest["graphs"]]
    for proto in protos:
        reduces = [node for node in proto.graph.node if node.op_type == "AllReduce"]
        assert reduces and all(node.domain == DOMAIN for node in reduces)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in reduces[0].attribute}
        assert attrs == {"plugin_namespace": b"nemo3", "plugin_version": b"1", "world_size": 2}
        assert check_graph(proto) == []
    model = load(model_folder(tp2_build))
    results = validate_tensorrt_folder(model, folder, log=lambda line: None)
    assert set(results) == {"rank0/backbone_r2_t1.onnx"} and set(results["rank0/backbone_r2_t1.onnx"]) == {"out",
                                                                                                        "logits"}
    with pytest.raises(ValueError, match=r"rank0/backbone_r2_t1.onnx \(rank 0\): output out differs"):
        compare_ranks(model, manifest["graphs"][0], [protos[0], protos[0]])


def test_the_ranks_evaluators_meet_at_each_collective():
    """Two ranks' graphs (s = AllReduce(x), y = AllGather(x)) run together: each rank gets the sum and the ranks' x
    in rank order."""
    import numpy as np

    from nemo3.engines.executors.onnx_collectives import collective_translations
    from nemo3.engines.executors.onnx_validate import run_ranks
    from nemo3.plugins.onnx_nodes import OPSET, plugin_attributes

    collective_translations()  # (registers the nodes' schemas)
    h = onnx.helper
    nodes = [h.make_node("AllReduce", ["x"], ["s"], domain=DOMAIN, **plugin_attributes(world_size=2)),
             h.make_node("AllGather", ["x"], ["y"], domain=DOMAIN, **plugin_attributes(world_size=2))]
    graph = h.make_graph(nodes, "collectives", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                         [h.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [2, 3]),
                          h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 3])])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(DOMAIN, OPSET)])
    assert check_graph(proto) == []
    xs = [np.arange(6, dtype=np.float32).reshape(2, 3) * (rank + 1) for rank in range(2)]
    outputs = run_ranks([proto, proto], [{"x": x} for x in xs])
    for total, gathered in outputs:
        np.testing.assert_array_equal(total, xs[0] + xs[1])
        np.testing.assert_array_equal(gathered, np.concatenate(xs))


def test_tensorrt_engines_of_a_tp_build_are_refused_in_one_line(tp2_build):
    from nemo3.engines.executors.tensorrt_build import build_plans

    with pytest.raises(RuntimeError, match=r"--tp 2 ranks, whose AllReduce/AllGather nodes need TensorRT plugins"):
        build_plans(BuildFolder(tp2_build).tensorrt)


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
