"""The plugins' ops as ONNX nodes of domain `nemo3`: the node each op becomes, its schema, its translation.

Each op is one node whose op_type names the TensorRT plugin, with the attributes TensorRT's ONNX parser reads to
find it (`plugin_namespace="nemo3"`, `plugin_version`) and the op's scalar arguments as attributes. An op that
updates a state pool takes the pool as an input and gives its updated value as an output (the engine aliases the
two); with `intermediate_states` (speculative verify) it is the `_steps` node, which also takes and gives the
per-token states. Optional inputs do not exist: a missing conv bias is a zero bias (plugins/causal_conv1d_update.py).

`register_schemas()` makes the nodes known to onnx (checker, shape inference, onnxscript); `translation_table()`
maps the functional custom ops to onnxscript functions for `torch.onnx.export(custom_translation_table=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "nemo3"
PLUGIN_NAMESPACE = "nemo3"
PLUGIN_VERSION = "1"
OPSET = 1


@dataclass(frozen=True)
class NodeSpec:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict  # name -> "int" | "float" (besides plugin_namespace and plugin_version)
    aliased: dict  # output index -> the input index it updates in place


MAMBA_ATTRS = {"dt_softplus": "int", "dt_min": "float", "dt_max": "float"}
MAMBA_INPUTS = ("state_pool", "x", "dt", "A", "B", "C", "D", "dt_bias", "slots")
CONV_INPUTS = ("x", "conv_pool", "weight", "bias", "slots")
ATTENTION_INPUTS = ("q", "k_pages", "v_pages", "block_table", "seq_lens")
ATTENTION_ATTRS = {"scale": "float", "max_pages": "int"}  # max_pages: the pages per row the reference reads
NODES = {spec.op_type: spec for spec in (
    NodeSpec("mamba2_state_update", MAMBA_INPUTS, ("y", "state_pool_out"), MAMBA_ATTRS, {1: 0}),
    NodeSpec("mamba2_state_update_steps", MAMBA_INPUTS + ("intermediate_states",),
             ("y", "state_pool_out", "intermediate_states_out"), MAMBA_ATTRS, {1: 0, 2: 9}),
    NodeSpec("causal_conv1d_update", CONV_INPUTS, ("out", "conv_pool_out"), {"silu": "int"}, {1: 1}),
    NodeSpec("causal_conv1d_update_steps", CONV_INPUTS + ("intermediate_states",),
             ("out", "conv_pool_out", "intermediate_states_out"), {"silu": "int"}, {1: 1, 2: 5}),
    NodeSpec("paged_attention", ATTENTION_INPUTS, ("out",), ATTENTION_ATTRS, {}),
    NodeSpec("paged_attention_fp8", ATTENTION_INPUTS + ("k_scale", "v_scale"), ("out",), ATTENTION_ATTRS, {}),
    NodeSpec("latent_moe_route", ("router_logits", "correction_bias"), ("weights", "expert_ids"),
             {"top_k": "int", "n_group": "int", "topk_group": "int", "norm_topk_prob": "int",
              "routed_scaling_factor": "float"}, {}),
)}
TENSOR_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int32)", "tensor(int64)"]


def register_schemas() -> None:
    """Register every nemo3 node's schema with onnx (once per process)."""
    register_node_schemas(NODES.values())


def register_node_schemas(specs) -> None:
    """Register the schemas of nemo3 nodes `specs` (NodeSpecs) with onnx, those not registered yet."""
    import onnx

    for spec in specs:
        if onnx.defs.has(spec.op_type, DOMAIN):
            continue
        kinds = {"int": onnx.defs.OpSchema.AttrType.INT, "float": onnx.defs.OpSchema.AttrType.FLOAT}
        attributes = [onnx.defs.OpSchema.Attribute(name, onnx.defs.OpSchema.AttrType.STRING, "plugin lookup")
                      for name in ("plugin_namespace", "plugin_version")]
        attributes += [onnx.defs.OpSchema.Attribute(name, kinds[kind], name) for name, kind in spec.attributes.items()]
        inputs = [onnx.defs.OpSchema.FormalParameter(name, f"I{i}") for i, name in enumerate(spec.inputs)]
        outputs = [onnx.defs.OpSchema.FormalParameter(name, f"O{i}") for i, name in enumerate(spec.outputs)]
        constraints = [(f"{side}{i}", TENSOR_TYPES, "any tensor") for side, names in (("I", spec.inputs),
                                                                                      ("O", spec.outputs))
                       for i in range(len(names))]
        onnx.defs.register_schema(onnx.defs.OpSchema(spec.op_type, DOMAIN, OPSET, inputs=inputs, outputs=outputs,
                                                     type_constraints=constraints, attributes=attributes,
                                                     doc=f"nemo3 plugin {spec.op_type}"))


def plugin_attributes(**scalars) -> dict:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, **scalars}


def translation_table() -> dict:
    """torch op -> onnxscript function emitting its nemo3 node (for torch.onnx.export)."""
    import onnxscript
    import torch

    register_schemas()
    nemo3 = onnxscript.values.Opset(DOMAIN, OPSET)

    def mamba2(state_pool, x, dt, A, B, C, D, dt_bias, slots, dt_softplus: bool, dt_min: float, dt_max: float,
               intermediate_states=None):
        attrs = plugin_attributes(dt_softplus=int(dt_softplus), dt_min=float(dt_min), dt_max=float(dt_max))
        args = (state_pool, x, dt, A, B, C, D, dt_bias, slots)
        if intermediate_states is None:
            y, pool = nemo3.mamba2_state_update(*args, **attrs)
            return y, pool, onnxscript.opset18.Constant(value_floats=[])
        return nemo3.mamba2_state_update_steps(*args, intermediate_states, **attrs)

    def conv(x, conv_pool, weight, bias, slots, silu: bool, intermediate_states=None):
        attrs = plugin_attributes(silu=int(silu))
        if intermediate_states is None:
            out, pool = nemo3.causal_conv1d_update(x, conv_pool, weight, bias, slots, **attrs)
            return out, pool, onnxscript.opset18.Constant(value_floats=[])
        return nemo3.causal_conv1d_update_steps(x, conv_pool, weight, bias, slots, intermediate_states, **attrs)

    def route(router_logits, correction_bias, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
              routed_scaling_factor: float, impl: str = ""):
        return nemo3.latent_moe_route(router_logits, correction_bias, **plugin_attributes(
            top_k=int(top_k), n_group=int(n_group), topk_group=int(topk_group), norm_topk_prob=int(norm_topk_prob),
            routed_scaling_factor=float(routed_scaling_factor)))

    def attention(q, k_pages, v_pages, block_table, seq_lens, scale: float, k_scale=None, v_scale=None,
                  max_pages: int = -1, impl: str = ""):
        attrs = plugin_attributes(scale=float(scale), max_pages=int(max_pages))
        if k_scale is None:
            return nemo3.paged_attention(q, k_pages, v_pages, block_table, seq_lens, **attrs)
        return nemo3.paged_attention_fp8(q, k_pages, v_pages, block_table, seq_lens, k_scale, v_scale, **attrs)

    ops = torch.ops.nemo3
    return {ops.mamba2_state_update_functional.default: mamba2, ops.causal_conv1d_update_functional.default: conv,
            ops.latent_moe_route.default: route, ops.paged_attention.default: attention}
