"""OUT/engines/tensorrt/: the step graphs of a checkpoint as ONNX for TensorRT, with manifest.json.

One graph per compiled step shape (`tensorrt_shapes`: CompiledSteps.shapes, THE declaration the AOT engines also
export), each for max_sequences rows over a block table of max_length tokens per slot (onnx_export.py,
step_export.py): the decode step (T=1), the prefill chunks (T in prefill_tokens, rows right-padded with their
lengths) and, with an MTP head, the greedy speculative step (verify K+1 tokens, accept, roll back, draft K) and, with
`sampling`, the sampling speculative step (the caller's uniforms, per-row temperature/top_k/top_p and each slot's
draft distributions `draft_probs` as inputs, the updated `draft_probs.out` aliased: no random node). The
manifest lists each graph's inputs and outputs, its aliased pairs (updated pool -> pool), the nemo3 plugins it uses
(each kernel's PTX is compiled when the engine is built: plugins/tensorrt_plugins.py) and the command that builds
the engines where TensorRT is installed (tensorrt_build.py). `validate_tensorrt_folder` runs every graph in onnx's
reference evaluator against the torch executor (onnx_validate.py): `nemo3 validate-onnx OUT`.

A --tp N > 1 build has each rank's graphs (`rank{r}/`, `rank` in each entry, `tp` in the manifest), exported from the
rank's weights with its collectives as AllReduce/AllGather nodes (onnx_collectives.py); the validator runs the ranks'
graphs of a step (decode, prefill, greedy and sampling speculative) together, one reference evaluator per rank
meeting at each collective, against the tp 1 executor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .compiled_step import PREFILL_TOKENS, CompiledSteps
from .step_export import StepShape, stand_in_group, step_shapes

MANIFEST = "manifest.json"
FORMAT = 2


@dataclass(frozen=True)
class TensorRTTarget:
    max_sequences: int = 16
    max_length: int = 256
    max_tokens: int = 3  # tokens per row of a speculative step: 1 + the MTP draft length served
    prefill_tokens: tuple[int, ...] = PREFILL_TOKENS  # prefill chunk lengths (compiled_step.py)
    sampling: bool = True  # also the sampling speculative step


def build_command(folder: Path) -> str:
    return f"python -m nemo3.engines.executors.tensorrt_build {folder}"


def tensorrt_shapes(model, target: TensorRTTarget) -> list[StepShape]:
    """The compiled steps' shapes (CompiledSteps.shapes: decode, prefill chunks, greedy speculative step), and the
    sampling speculative step with `target.sampling`."""
    state = model.new_state(target.max_sequences, target.max_length, mtp=model.mtp is not None)
    return step_shapes(CompiledSteps(model, state, target.prefill_tokens), target.max_tokens, target.sampling)


def graph_file(shape: StepShape, rows: int, rank: int = 0) -> str:
    kind = shape.step.removesuffix("_step") + ("_sampling" if shape.sampling else "")
    return f"rank{rank}/{kind}_r{rows}_t{shape.tokens}.onnx"


def write_tensorrt_folder(models, out: Path, target: TensorRTTarget, log=print) -> dict:
    """Export the graphs of `target` for `models` (every tensor-parallel rank's Model, in rank order, e.g. loaded one
    at a time; [model] at tp 1) into `out` (graphs + manifest.json); returns the stage's summary."""
    from ...plugins.onnx_nodes import DOMAIN, NODES
    from .onnx_export import export_step_onnx

    graphs = []
    for model in models:
        rank = model.parallel.rank
        with stand_in_group(model.parallel):
            for shape in tensorrt_shapes(model, target):
                file = graph_file(shape, target.max_sequences, rank)
                proto, inputs, outputs = export_step_onnx(model, shape, target.max_sequences, target.max_length,
                                                          out / file)
                graphs.append({"file": file, "rank": rank, "step": shape.step, "tokens": shape.tokens,
                               "sampling": shape.sampling, "rows": target.max_sequences,
                               "max_length": target.max_length, "inputs": inputs, "outputs": outputs,
                               "aliased": {name: name.removesuffix(".out") for name in outputs
                                           if name.endswith(".out")},
                               "plugins": sorted({n.op_type for n in proto.graph.node if n.domain == DOMAIN})})
                log(f"[tensorrt] {file}")
    used = sorted({p for g in graphs for p in g["plugins"]})
    manifest = {"format": FORMAT, "dtype": str(model.dtype).removeprefix("torch."), "tp": model.parallel.world_size,
                "graphs": graphs, "plugins": {name: list(NODES[name].inputs) for name in used if name in NODES},
                "engines": f"built where TensorRT is installed: `{build_command(Path('<this folder>'))}` (a .plan "
                           "next to each graph)"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"graphs": len(graphs), "plugins": used}


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TensorRT manifest (build with --target tensorrt)")
    return json.loads(path.read_text())


def validate_tensorrt_folder(model, folder: Path, log=print) -> dict[str, dict[str, float]]:
    """Check every graph of `folder` (onnx.checker with the nemo3 schemas, plugin attributes) and compare it with
    the torch executor on `model` (the whole model, at any tp) in the reference evaluator; {graph file: {output: max
    abs difference}} (a --tp build: rank 0's file, for the ranks' graphs of that step run together). Raises
    AssertionError/ValueError naming the graph and output that differ."""
    import onnx

    from .onnx_validate import check_graph, compare_step

    steps: dict[tuple, list[dict]] = {}
    for graph in read_manifest(folder)["graphs"]:
        steps.setdefault((graph["step"], graph["tokens"], graph["sampling"]), []).append(graph)
    results = {}
    for ranks in steps.values():
        protos = [onnx.load(str(Path(folder) / graph["file"])) for graph in ranks]
        for graph, proto in zip(ranks, protos):
            problems = check_graph(proto)
            if problems:
                raise ValueError(f"{Path(folder) / graph['file']}: {'; '.join(problems)}")
        graph = ranks[0]
        results[graph["file"]] = compare_step(model, graph, protos)
        log(f"{graph['file']}{f' (and the other {len(ranks) - 1} ranks)' if len(ranks) > 1 else ''}: "
            f"{len(results[graph['file']])} outputs equal the torch executor's "
            f"(max |diff| {max(results[graph['file']].values()):.2e})")
    return results
