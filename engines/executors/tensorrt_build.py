"""Building TensorRT engines from OUT/engines/tensorrt/ (tensorrt_folder.py), where TensorRT is installed:

    python -m nemo3.engines.executors.tensorrt_build OUT/engines/tensorrt

Each graph becomes `<graph>.plan` next to it: a strongly typed network (the graph's own Q/DQ precisions), static
shapes (the graphs have them: no optimization profile), parsed by TensorRT's ONNX parser, which finds each `nemo3`
node's plugin by op_type, `plugin_namespace` and `plugin_version` in TensorRT's plugin registry, where
plugins/tensorrt_plugins.py registers them (AOT: each kernel's PTX goes into the engine). `tensorrt` is imported only
here and there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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


def build_plans(folder: Path, log=print) -> list[Path]:
    """Build every graph of the manifest in `folder` into a .plan file; returns their paths."""
    from ...plugins.tensorrt_plugins import register_plugins

    manifest = read_manifest(folder)
    if manifest["tp"] > 1:
        raise RuntimeError(f"{WHERE}: {folder} holds the graphs of --tp {manifest['tp']} ranks, whose "
                           "AllReduce/AllGather nodes need TensorRT plugins (NCCL) nemo3 does not provide; build with "
                           "--tp 1")
    trt = import_tensorrt()
    register_plugins()  # the nemo3 nodes' AOT plugins, found by the parser in TensorRT's registry
    logger = trt.Logger(trt.Logger.WARNING)
    plans = []
    for graph in manifest["graphs"]:
        onnx_path = Path(folder) / graph["file"]
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
        serialized = builder.build_serialized_network(network, builder.create_builder_config())
        if serialized is None:
            raise RuntimeError(f"{onnx_path}: TensorRT could not build the engine (see its log above)")
        plan = onnx_path.with_suffix(".plan")
        plan.write_bytes(bytes(serialized))
        log(f"{plan}: built")
        plans.append(plan)
    return plans


if __name__ == "__main__":
    build_plans(Path(sys.argv[1]))
