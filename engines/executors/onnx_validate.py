"""Running an exported ONNX step graph on CPU in onnx's reference evaluator and comparing it with the torch executor.

The evaluator executes nemo3 nodes through the plugins' references (plugins/onnx_reference_ops.py) and TensorRT's
quantization nodes by their documented semantics (quant/onnx_reference_ops.py). `compare_step(model, graph, proto)`
fills a TorchExecutor's state with prompts (in a prefill graph slot 0 starts its sequence with a full chunk, every
other row continues its sequence with 1 .. T tokens; elsewhere every row continues), runs the same call through the
executor (eager) and through the graph from the same block table and pools (a sampling speculative step: the same
uniforms, sampling parameters and draft distributions), and returns the largest absolute difference of each output:
the step's result `out` (the final hidden states, and the logits the lm_head makes of them; a speculative step's
tokens, equal) and every updated pool (and `draft_probs`).
"""

from __future__ import annotations

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


def evaluator(proto):
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
    return ReferenceEvaluator(proto, new_ops=NEMO3_OPS + QUANT_OPS + [GatherElements])


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


@torch.inference_mode()
def compare_step(model, graph: dict, proto, seed: int = 0) -> dict[str, float]:
    """{output name: max |graph - executor|} for one call of manifest entry `graph` (tensorrt_folder.py: step,
    tokens, rows, max_length); module docstring."""
    from ...plugins.onnx_reference_ops import to_numpy, to_torch

    shape = StepShape(graph["step"], graph["tokens"], graph.get("sampling", False))
    g = torch.Generator().manual_seed(seed)
    executor = TorchExecutor(model, graph["rows"], graph["max_length"])
    past = _prompts(executor, shape, g)
    rows, T = graph["rows"], shape.tokens
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
    values.update({name: getattr(entry, attr).clone() for name, entry, attr in pool_fields(executor.state)})
    if shape.step == "speculative_step":  # row 0 drafts its greedy continuation (accepted), the others random tokens
        values["ids"][0, 1:] = torch.tensor(_greedy_tokens(executor, int(values["ids"][0, 0]), past[0], T - 1))
        values["num_drafts"][0] = T - 1
        for name, entry, attr in pool_fields(executor.state):
            getattr(entry, attr).copy_(values[name])
    feeds = {i.name: to_numpy(values[i.name]) for i in proto.graph.input}
    got = {o.name: to_torch(value) for o, value in zip(proto.graph.output, evaluator(proto).run(None, feeds))}

    want = _run_executor(executor, shape, values)
    if "logits" in want:  # a backbone or prefill step: its real tokens' hidden states, and their logits
        lengths = values["lengths"].tolist() if shape.step == "prefill_step" else [T] * rows
        got["out"] = torch.cat([got["out"][r, :lengths[r]] for r in range(rows)])
        got["logits"] = model.lm_head(got["out"].to(model.dtype)).float()
    pools = {f"{name}.out": getattr(entry, attr) for name, entry, attr in pool_fields(executor.state)}
    want.update({name: pools[name] for name in got if name in pools})
    quantized_activations = any(isinstance(m, QuantLinear) and m.layout.input_scale for m in model.modules())
    diffs = {}
    for name, expected in want.items():
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
            raise ValueError(f"{graph['file']}: output {name} differs from the torch executor: {e}") from e
        diffs[name] = float((actual.float() - expected.float()).abs().max()) if expected.numel() else 0.0
    return diffs


def check_graph(proto) -> list[str]:
    """onnx.checker with the nemo3 schemas registered, and the plugin attributes of every nemo3 node; returns the
    problems (empty when the graph is fine)."""
    import onnx

    from ...plugins.onnx_nodes import DOMAIN, NODES, PLUGIN_NAMESPACE, PLUGIN_VERSION, register_schemas
    from ...quant.onnx_nodes import register_schemas as register_trt_schemas

    register_schemas()
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
        spec = NODES.get(node.op_type)
        if spec is None:
            problems.append(f"node {node.name}: unknown nemo3 op_type {node.op_type}")
        elif attrs.get("plugin_namespace") != PLUGIN_NAMESPACE.encode() or \
                attrs.get("plugin_version") != PLUGIN_VERSION.encode() or not set(spec.attributes) <= set(attrs):
            problems.append(f"node {node.name} ({node.op_type}): plugin attributes {sorted(attrs)} are incomplete")
    return problems
