"""Building TensorRT engines from OUT/engines/tensorrt/ (tensorrt_folder.py), where TensorRT is installed:

    python -m nemo3.engines.executors.tensorrt_build OUT/engines/tensorrt

Each graph becomes `<graph>.plan` next to it (one engine per step graph: the graphs differ in their layers, not
only in shapes): a strongly typed network (the graph's own Q/DQ precisions) with the runtime's shapes
(`profile_shapes`: max_sequences rows, the step's tokens, the whole block table: the graphs are static, so an
optimization profile is added only for a dynamic dimension, the block table's columns), parsed by TensorRT's ONNX
parser, which finds each `nemo3`
node's plugin by op_type, `plugin_namespace` and `plugin_version` in TensorRT's plugin registry, where
plugins/tensorrt_plugins.py registers them (AOT: each kernel's PTX goes into the engine). `tensorrt` is imported only
here and there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ...export.kv_pages import pages_for
from .step_export import TABLE
from .tensorrt_folder import read_manifest

WHERE = "engines/executors/tensorrt_build.py"


def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeError(f"{WHERE}: TensorRT is not installed here (pip install tensorrt, on a machine with an "
                           "NVIDIA GPU); the ONNX graphs are built into engines where it is") from e
    return tensorrt


def profile_shapes(inputs: dict[str, tuple], graph: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min, opt, max) shape} for the runtime's calls of manifest entry `graph`, from the network's input
    shapes (a dynamic dimension: -1 or a name). The runtime passes the whole block table, so its columns, if
    dynamic, range from 1 to the table's width (opt: the width); any other dynamic dimension is refused."""
    width = pages_for(graph["max_length"])  # (the graphs' states have the default page size: onnx_export.py)
    shapes = {}
    for name, shape in inputs.items():
        bounds = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim >= 0:
                bounds.append((dim, dim))
            elif name == TABLE and axis == 1:
                bounds.append((1, width))
            else:
                raise ValueError(f"{graph['file']}: input {name} has a dynamic dimension {axis} ({dim}) the runtime "
                                 "does not vary")
        low, high = (tuple(b[i] for b in bounds) for i in (0, 1))
        shapes[name] = (low, high, high)
    return shapes


def build_plans(folder: Path, log=print) -> list[Path]:
    """Build every graph of the manifest in `folder` into a .plan file; returns their paths."""
    from ...plugins.tensorrt_plugins import register_plugins

    trt = import_tensorrt()
    register_plugins()  # the nemo3 nodes' AOT plugins, found by the parser in TensorRT's registry
    logger = trt.Logger(trt.Logger.WARNING)
    plans = []
    for graph in read_manifest(folder)["graphs"]:
        onnx_path = Path(folder) / graph["file"]
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
        shapes = profile_shapes(inputs, graph)
        if any(low != high for low, _, high in shapes.values()):
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in shapes.items():
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"{onnx_path}: TensorRT could not build the engine (see its log above)")
        plan = onnx_path.with_suffix(".plan")
        plan.write_bytes(bytes(serialized))
        log(f"{plan}: built")
        plans.append(plan)
    return plans


if __name__ == "__main__":
    try:
        build_plans(Path(sys.argv[1]))
    except (RuntimeError, FileNotFoundError) as e:
        sys.exit(str(e))
