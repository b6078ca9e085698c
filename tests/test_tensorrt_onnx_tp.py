"""The tensorrt target of a --tp 2 build (engines/executors/onnx_collectives.py, onnx_validate.py): each rank's decode
and speculative graphs, with nemo3 AllReduce/AllGather nodes, run together in onnx's reference evaluator against the
tp 1 torch executor (a file of its own: its build is one of the suite's longest fixtures)."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from nemo3.engines.executors.onnx_validate import check_graph, compare_step  # noqa: E402
from nemo3.engines.executors.tensorrt_folder import read_manifest, validate_tensorrt_folder  # noqa: E402
from nemo3.engines.network.loading import load  # noqa: E402
from nemo3.export.build_folder import BuildFolder, model_folder  # noqa: E402
from nemo3.pipeline import BuildOptions, run_stages  # noqa: E402
from nemo3.plugins.onnx_nodes import DOMAIN  # noqa: E402

pytestmark = pytest.mark.timeout(1800)
ROWS, LENGTH = 2, 32

@pytest.fixture(scope="module")
def tp2_build(tmp_path_factory):
    """A --tp 2 --moe-parallel tp build's decode, greedy and sampling speculative (2 drafts) graphs, one per rank."""
    out = tmp_path_factory.mktemp("trt") / "tp2"
    options = BuildOptions(output=out, precision="bf16", target="tensorrt", tp=2, moe_parallel="tp",
                           engine_max_sequences=ROWS, engine_max_length=LENGTH, engine_prefill_tokens=(), engine_mtp=2)
    logs = []
    record = run_stages(options, ["quantize", "shard", "tensorrt"], log=logs.append)
    assert record["stages"]["tensorrt"]["graphs"] == 6, logs
    return out


def test_tp2_rank_graphs_run_together_give_the_tp1_executor(tp2_build):
    """Each rank's graph holds its all-reduces as AllReduce nodes with the plugin attributes and passes the checker;
    the two ranks' graphs of each step, run together in the reference evaluator from the tp 1 executor's prompted
    state (each rank fed its part of every pool), give the tp 1 torch executor's hidden states and logits (decode),
    accepted counts and tokens (greedy and sampling speculative steps, the same uniforms and draft distributions),
    draft distributions, and each rank's part of every updated pool. Rank 0's graph in both places does not, nor
    do the ranks' graphs with their AllReduce nodes skipped."""
    folder = BuildFolder(tp2_build).tensorrt
    manifest = read_manifest(folder)
    assert manifest["tp"] == 2
    files = ["backbone_r2_t1.onnx", "speculative_r2_t3.onnx", "speculative_sampling_r2_t3.onnx"]
    assert [(g["rank"], g["file"]) for g in manifest["graphs"]] == [(r, f"rank{r}/{f}") for r in (0, 1) for f in files]
    graphs = {(g["rank"], g["file"].split("/")[1]): g for g in manifest["graphs"]}
    protos = {key: onnx.load(str(folder / g["file"])) for key, g in graphs.items()}
    for proto in protos.values():
        reduces = [node for node in proto.graph.node if node.op_type == "AllReduce"]
        assert reduces and all(node.domain == DOMAIN for node in reduces)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in reduces[0].attribute}
        assert attrs == {"plugin_namespace": b"nemo3", "plugin_version": b"1", "world_size": 2}
        assert check_graph(proto) == []
    model = load(model_folder(tp2_build))
    results = validate_tensorrt_folder(model, folder, log=lambda line: None)
    assert set(results) == {f"rank0/{f}" for f in files}
    for f in files:
        graph = graphs[0, f]
        pools = {name for name in graph["outputs"] if name.endswith(".out")}
        assert pools and set(results[f"rank0/{f}"]) == set(graph["outputs"]) | (
            {"logits"} if graph["step"] != "speculative_step" else set())
    assert "draft_probs.out" in results["rank0/speculative_sampling_r2_t3.onnx"]
    for f in files:
        with pytest.raises(ValueError, match=rf"rank0/{f} \(rank [01]\): output .* differs from the tp 1"):
            compare_step(model, graphs[0, f], [protos[0, f], protos[0, f]])
    skipped = []
    for rank in (0, 1):
        proto = onnx.ModelProto()
        proto.CopyFrom(protos[rank, files[2]])
        for node in proto.graph.node:
            if node.op_type == "AllReduce":
                node.op_type, node.domain = "Identity", ""
                del node.attribute[:]
        skipped.append(proto)
    with pytest.raises(ValueError, match=rf"rank0/{files[2]} \(rank 0\): output .* differs from the tp 1"):
        compare_step(model, graphs[0, files[2]], skipped)


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
