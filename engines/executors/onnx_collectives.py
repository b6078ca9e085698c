"""The network's collectives in the ONNX step graph of a tensor-parallel rank, and their reference implementation.

A rank's step program holds torch's functional collectives (engines/network/parallel.py); each becomes one node of
domain `nemo3` with the attributes TensorRT's ONNX parser uses to find a plugin (`plugin_namespace`,
`plugin_version`, as the nemo3 plugin nodes; TensorRT-LLM's NCCL plugins are nodes of this kind), and `world_size`:

    AllReduce(x) -> y            the sum of every rank's x
    AllGather(x) -> y            every rank's x concatenated in rank order along axis 0: [world_size * x.shape[0], ...]

(`wait_tensor` becomes an Identity.) The plugins behind them (NCCL, one communicator of the ranks' engines) are
TensorRT's side and not built here. `rank_ops(rank, exchange)` implements both nodes for onnx's reference evaluator:
one evaluator per rank, each on its own thread, meeting at every collective through a shared `Exchange`.
"""

from __future__ import annotations

import threading

import numpy as np

from ...plugins.onnx_nodes import DOMAIN, OPSET, NodeSpec, plugin_attributes, register_node_schemas

COLLECTIVES = {spec.op_type: spec for spec in (
    NodeSpec("AllReduce", ("x",), ("y",), {"world_size": "int"}, {}),
    NodeSpec("AllGather", ("x",), ("y",), {"world_size": "int"}, {}),
)}
TIMEOUT_S = 600.0  # how long a rank's evaluator waits for the others at one collective


def collective_translations() -> dict:
    """torch's functional collectives -> onnxscript functions emitting their nodes (for torch.onnx.export)."""
    import onnxscript
    import torch

    register_node_schemas(COLLECTIVES.values())
    nemo3, op = onnxscript.values.Opset(DOMAIN, OPSET), onnxscript.opset18

    def all_reduce(x, reduce_op: str, group_name: str):
        if reduce_op != "sum":
            raise ValueError(f"all_reduce {reduce_op!r}: the AllReduce node sums")
        return nemo3.AllReduce(x, **plugin_attributes(world_size=_world_size(group_name)))

    def all_gather(x, group_size: int, group_name: str):
        return nemo3.AllGather(x, **plugin_attributes(world_size=int(group_size)))

    def wait(x):
        return op.Identity(x)

    c10d = torch.ops._c10d_functional
    return {c10d.all_reduce.default: all_reduce, c10d.all_gather_into_tensor.default: all_gather,
            c10d.wait_tensor.default: wait}


def _world_size(group_name: str) -> int:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_world_size(_resolve_process_group(group_name))


class Exchange:
    """Where `world_size` ranks' evaluators meet: `gather(rank, x)` returns every rank's x, in rank order, once every
    rank has called it. A rank that fails breaks the barrier, and the others raise instead of waiting."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=TIMEOUT_S)
        self.slots: list = [None] * world_size

    def gather(self, rank: int, x: np.ndarray) -> list[np.ndarray]:
        self.slots[rank] = x
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()  # (nobody writes the next collective's value before everybody has read this one's)
        return every

    def abort(self) -> None:
        self.barrier.abort()


def rank_ops(rank: int, exchange: Exchange) -> list:
    """The AllReduce and AllGather nodes of rank `rank` for ReferenceEvaluator(new_ops=...)."""
    from onnx.reference.op_run import OpRun

    class AllReduce(OpRun):
        op_domain = DOMAIN

        def _run(self, x, world_size=None, plugin_namespace=None, plugin_version=None):
            return (_sum(exchange.gather(rank, x)),)  # (in rank order: every rank gets the same value)

    class AllGather(OpRun):
        op_domain = DOMAIN

        def _run(self, x, world_size=None, plugin_namespace=None, plugin_version=None):
            return (np.concatenate(exchange.gather(rank, x), axis=0),)

    return [AllReduce, AllGather]


def _sum(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total
