"""Running an exported ONNX step graph on CPU in onnx's reference evaluator and comparing it with the torch executor.

The evaluator executes nemo3 nodes through the plugins' references (plugins/onnx_reference_ops.py) and TensorRT's
quantization nodes by their documented semantics (quant/onnx_reference_ops.py). `compare_step(model, graph, protos)`
fills a TorchExecutor's state with prompts (in a prefill graph slot 0 starts its sequence with a full chunk, every
other row continues its sequence with 1 .. T tokens; elsewhere every row continues), runs the same call through the
executor (eager) and through the graph from the same block table and pools (a sampling speculative step: the same
uniforms, sampling parameters and draft distributions), and returns the largest absolute difference of each output:
the step's result `out` (the final hidden states, and the logits the lm_head makes of them; a speculative step's
accepted counts and tokens, equal) and every updated pool (and `draft_probs`).

The ranks' graphs of a --tp N > 1 build (tensorrt_folder.py, `protos` in rank order) are compared the same way
against the tp 1 executor on `model`: the ranks' evaluators run together, one thread each, meeting at every AllReduce
and AllGather (onnx_collectives.py); each rank is fed its part of every tp 1 pool (`rank_pool`: its Mamba channels
and heads, its KV heads, cut by the sharding rule of the weight that fills the pool, export/sharding.py) and each of
its updated pools must equal its part of the executor's; `out` (and `draft_probs`) must equal the executor's on every
rank.
"""

from __future__ import annotations

import numpy as np
import torch

from ..network.quant_linear import QuantLinear
from .base import RaggedBatch, SpeculativeBatch
from .step_export import TABLE, StepShape, pool_fields
from .torch_executor import TorchExecutor

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding: the evaluator sums in numpy's order, torch in its own
# A model that quantizes activations (FP8 W8A8, NVFP4 W4A4): a last-bit difference can move one activation across
# an FP8/E2M1 rounding boundary (seen in the fp8 speculative graph: 1.15e-5 of a pool's largest value), so its
# outputs are compared against their largest value, as tests/test_quant_compiled.py compares compiled and eager
QUANTIZED_ACTIVATIONS_BOUND = 2e-5


def evaluator(proto, extra_ops: list = ()):
    import numpy as np
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from ...plugins.onnx_nodes import register_schemas
    from ...plugins.onnx_reference_ops import NEMO3_OPS
    from ...quant.onnx_reference_ops import QUANT_OPS

    class GatherElements(OpRun):
        """onnx's own (numpy.choose) takes at most 64 entries along the axis (a 64-token prefill chunk has more)."""

        def _run(self, data, indices, axis=0):
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis),)

    register_schemas()
    return ReferenceEvaluator(proto, new_ops=NEMO3_OPS + QUANT_OPS + [GatherElements, *extra_ops])


def _prompts(executor: TorchExecutor, shape: StepShape, generator: torch.Generator) -> list[int]:
    """Prefill every slot with a random prompt; the past lengths of the call to compare (0 for a fresh slot 0 in
    a prefill graph)."""
    vocab, rows = executor.spec.vocab_size, executor.max_sequences
    lengths = torch.randint(1, 9, (rows,), generator=generator).tolist()
    sequences = [(torch.randint(0, vocab, (n,), generator=generator).tolist(), 0, slot)
                 for slot, n in enumerate(lengths)]
    executor.forward(RaggedBatch.build(sequences, [0]))
    if shape.step == "prefill_step":
        lengths[0] = 0
    return lengths


def _greedy_tokens(executor: TorchExecutor, token: int, past: int, n: int) -> list[int]:
    """The n greedy tokens after `token` in slot 0 (which has `past` tokens); changes the executor's pools."""
    tokens = []
    for j in range(n):
        logits = executor.forward(RaggedBatch.build([([token], past + j, 0)], [0])).logits
        token = int(logits[0].argmax())
        tokens.append(token)
    return tokens


def _run_executor(executor: TorchExecutor, shape: StepShape, values: dict) -> dict[str, torch.Tensor]:
    rows, T = executor.max_sequences, shape.tokens
    ids, past = values["ids"], values["past"].tolist()
    if shape.step == "speculative_step":
        if shape.sampling:  # each slot's draft distributions, as the graph reads them
            executor._draft_probs[T - 1] = values["draft_probs"].clone()
        tokens = executor.speculate(SpeculativeBatch(ids, values["num_drafts"], values["past"], values["slots"],
                                                     values["temperature"], values["top_k"], values["top_p"],
                                                     values["uniforms"] if shape.sampling else None))
        return {"out": torch.tensor(tokens)} | ({"draft_probs.out": executor._draft_probs[T - 1]}
                                                if shape.sampling else {})
    lengths = values["lengths"].tolist() if shape.step == "prefill_step" else [T] * rows
    batch = RaggedBatch.build([(ids[r, :lengths[r]].tolist(), past[r], r) for r in range(rows)],
                              list(range(sum(lengths))))
    out = executor.forward(batch)
    return {"out": out.hidden, "logits": out.logits}  # (the real tokens, packed)


# The weight whose sharding rule (export/sharding.py) cuts each kind of pool, and the pool's axis it cuts: a rank's
# pools hold its Mamba channels (the x, B, C segments) and heads and its KV heads (engines/network/state.py)
POOL_SHARDS = {"conv": ("mixer.conv1d.weight", 1), "ssm": ("mixer.A_log", 1), "k": ("mixer.k_proj.weight", 2),
               "v": ("mixer.v_proj.weight", 2)}


def rank_pool(layer: str, attr: str, pool: torch.Tensor, spec, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank` of `tp`'s part of pool `attr` of layer `layer` (a key of InferenceState.layers) of a tp 1 state."""
    from ...export.sharding import Shard, shard_of

    weight, axis = POOL_SHARDS[attr]
    shard = shard_of(f"{layer}.{weight}", (pool.shape[axis],), pool.dtype, spec, tp, rank)
    return pool if shard.axis is None else Shard(axis, shard.ranges).apply(pool)


@torch.inference_mode()
def compare_step(model, graph: dict, protos: list, seed: int = 0) -> dict[str, float]:
    """{output name: max |graph - executor| over the ranks} for one call of manifest entry `graph` (tensorrt_folder.py:
    step, tokens, rows, max_length), `protos` its graph of each rank in rank order ([proto] at tp 1), against the
    tp 1 torch executor on `model`; module docstring."""
    from ...plugins.onnx_reference_ops import to_numpy, to_torch

    shape = StepShape(graph["step"], graph["tokens"], graph.get("sampling", False))
    g = torch.Generator().manual_seed(seed)
    executor = TorchExecutor(model, graph["rows"], graph["max_length"])
    past = _prompts(executor, shape, g)
    rows, T, tp = graph["rows"], shape.tokens, len(protos)
    values = {"ids": torch.randint(0, model.spec.vocab_size, (rows, T), generator=g),
              "num_drafts": torch.randint(0, T, (rows,), generator=g), "slots": torch.arange(rows),
              "past": torch.tensor(past), "lengths": torch.tensor([T] + [1 + r % T for r in range(1, rows)]),
              "temperature": torch.zeros(rows), "top_k": torch.zeros(rows, dtype=torch.long),
              "top_p": torch.ones(rows), TABLE: executor.state.pages.table.clone()}
    if shape.sampling:  # row 0 greedy, the others sampled (odd rows also top-k) from the given uniforms
        vocab, K = model.spec.vocab_size, T - 1
        values["temperature"][1:] = 0.5 + torch.rand(rows - 1, generator=g)
        values["top_k"][1::2] = vocab // 4
        values["top_p"][1:] = 0.9
        values["uniforms"] = torch.rand(rows, 2 * K + 1, generator=g)
        values["draft_probs"] = torch.randn(rows, K, vocab, generator=g).softmax(-1)
    pools = pool_fields(executor.state)
    values.update({name: getattr(entry, attr).clone() for name, entry, attr in pools})
    if shape.step == "speculative_step":  # row 0 drafts its greedy continuation (accepted), the others random tokens
        values["ids"][0, 1:] = torch.tensor(_greedy_tokens(executor, int(values["ids"][0, 0]), past[0], T - 1))
        values["num_drafts"][0] = T - 1
        for name, entry, attr in pools:
            getattr(entry, attr).copy_(values[name])

    def share(tensors: dict, rank: int, suffix: str = "") -> dict:
        """`tensors` with each pool `<name><suffix>` replaced by rank `rank`'s part of it."""
        return tensors | {name + suffix: rank_pool(name.removesuffix(f".{attr}"), attr, tensors[name + suffix],
                                                   model.spec, tp, rank)
                          for name, _, attr in pools if name + suffix in tensors}

    feeds = []
    for rank, proto in enumerate(protos):
        inputs = share(values, rank)
        feeds.append({i.name: to_numpy(inputs[i.name]) for i in proto.graph.input})
    outputs = run_ranks(protos, feeds)

    want = _run_executor(executor, shape, values)
    updated = {f"{name}.out": getattr(entry, attr) for name, entry, attr in pools}
    quantized_activations = any(isinstance(m, QuantLinear) and m.layout.input_scale for m in model.modules())
    diffs = {}
    for rank, (proto, results) in enumerate(zip(protos, outputs)):
        got = {o.name: to_torch(value) for o, value in zip(proto.graph.output, results)}
        if "logits" in want:  # a backbone or prefill step: its real tokens' hidden states, and their logits
            lengths = values["lengths"].tolist() if shape.step == "prefill_step" else [T] * rows
            got["out"] = torch.cat([got["out"][r, :lengths[r]] for r in range(rows)])
            got["logits"] = model.lm_head(got["out"].to(model.dtype)).float()
        for name, expected in share(want | {name: updated[name] for name in got if name in updated}, rank,
                                    ".out").items():
            actual = got[name].reshape(expected.shape)
            try:
                if shape.step == "speculative_step" and name == "out":
                    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
                elif quantized_activations:
                    bound = QUANTIZED_ACTIVATIONS_BOUND * float(expected.float().abs().max())
                    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=bound)
                else:
                    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE)
            except AssertionError as e:
                where = f" (rank {rank})" if tp > 1 else ""
                raise ValueError(f"{graph['file']}{where}: output {name} differs from the{' tp 1' * (tp > 1)} torch "
                                 f"executor: {e}") from e
            diff = float((actual.float() - expected.float()).abs().max()) if expected.numel() else 0.0
            diffs[name] = max(diffs.get(name, 0.0), diff)
    return diffs


def run_ranks(protos: list, feeds: list[dict]) -> list[list]:
    """Every rank's outputs of its graph in `protos` on its `feeds`, the ranks' evaluators run together on one
    thread each (their collectives meet in one Exchange); the first rank's error is raised."""
    import threading

    from .onnx_collectives import Exchange, rank_ops

    exchange, results, errors = Exchange(len(protos)), [None] * len(protos), []

    def run(rank: int) -> None:
        try:
            results[rank] = evaluator(protos[rank], rank_ops(rank, exchange)).run(None, feeds[rank])
        except BaseException as e:  # (the others then stop at their next collective)
            errors.append(e)
            exchange.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(protos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def check_graph(proto) -> list[str]:
    """onnx.checker with the nemo3 schemas registered, and the plugin attributes of every nemo3 node; returns the
    problems (empty when the graph is fine)."""
    import onnx

    from ...plugins.onnx_nodes import (DOMAIN, NODES, PLUGIN_NAMESPACE, PLUGIN_VERSION, register_node_schemas,
                                       register_schemas)
    from ...quant.onnx_nodes import register_schemas as register_trt_schemas
    from .onnx_collectives import COLLECTIVES

    register_schemas()
    register_node_schemas(COLLECTIVES.values())
    register_trt_schemas()
    problems = []
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        problems.append(f"onnx.checker: {str(e).splitlines()[0]}")
    shadowed = {f.name for f in proto.functions} & set(NODES)
    if shadowed:
        problems.append(f"local functions shadow plugin nodes: {sorted(shadowed)}")
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        spec = NODES.get(node.op_type) or COLLECTIVES.get(node.op_type)
        if spec is None:
            problems.append(f"node {node.name}: unknown nemo3 op_type {node.op_type}")
        elif attrs.get("plugin_namespace") != PLUGIN_NAMESPACE.encode() or \
                attrs.get("plugin_version") != PLUGIN_VERSION.encode() or not set(spec.attributes) <= set(attrs):
            problems.append(f"node {node.name} ({node.op_type}): plugin attributes {sorted(attrs)} are incomplete")
    return problems
