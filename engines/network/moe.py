"""The (Latent)MoE mixer: sigmoid router with group-limited top-k, squared-ReLU experts, shared expert.

    weights, ids = route(W_g h)                       # fp32, plugins/latent_moe_route.py
    routed      = fc2_latent_proj(sum_k weights_k * expert_{ids_k}(fc1_latent_proj(h)))
    out         = routed + shared_experts(h)

LatentMoE (`moe_latent_size`) runs the routed experts in a smaller latent space; the router and the
shared expert always see the full hidden state. Without a latent size the projections are absent.

Tensor parallel: the router and the latent projections are replicated; every rank routes every token
(global expert ids). With --moe-parallel ep a rank holds whole experts (`experts.{e}` keeps the global
e) and adds the contributions of its own; with tp it holds a slice of every expert. Each rank's
routed sum (after fc2_latent_proj, which is linear) and its shared-expert slice are partial sums of
the output: one all-reduce per layer adds them up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...export.spec import ModelSpec
from ...plugins.dispatch import functional_mode, use_triton
from ...plugins.grouped_gemm import grouped_gemm
from ...plugins.latent_moe_route import latent_moe_route
from ...quant.layout import NVFP4
from .mlp import ReLU2MLP
from .parallel import SINGLE, Parallel
from .quant_linear import QuantLinear, fake_quantize_input


class Router(nn.Module):
    """Router weight [E, D] and the fp32 correction bias [E] that steers the choice only.

    Sigmoid scores, group-limited top-k on scores + bias, weights = the chosen unbiased scores
    (renormalized if norm_topk_prob) times routed_scaling_factor: the `latent_moe_route` op.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.n_routed_experts, spec.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(spec.n_routed_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = spec.num_experts_per_tok, spec.n_group, spec.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = spec.norm_topk_prob, spec.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
        logits = F.linear(x.float(), self.weight.float())
        return latent_moe_route(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)


WHERE = "engines/network/moe.py"
GATHER_MAX_PAIRS = 16  # (token, expert) pairs up to which experts run as one gathered batched matmul


class MoE(nn.Module):
    """x [B, T, D] -> [B, T, D]."""

    def __init__(self, spec: ModelSpec, parallel: Parallel = SINGLE):
        super().__init__()
        D, De = spec.hidden_size, spec.expert_dim
        self.parallel = parallel
        self.gate = Router(spec)
        self.experts = nn.ModuleDict({str(e): ReLU2MLP(De, spec.moe_intermediate_size, spec.mlp_bias,
                                                       parallel.expert_parallel)
                                      for e in parallel.experts(spec.n_routed_experts)})
        if spec.moe_shared_expert_intermediate_size:
            self.shared_experts = ReLU2MLP(D, spec.moe_shared_expert_intermediate_size, spec.mlp_bias, parallel)
        if spec.moe_latent_size:
            self.fc1_latent_proj = nn.Linear(D, spec.moe_latent_size, bias=spec.mlp_bias)
            self.fc2_latent_proj = nn.Linear(spec.moe_latent_size, D, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(0, -2)  # [T, D]
        weights, ids = self.gate(tokens)
        latent = self.fc1_latent_proj(tokens) if hasattr(self, "fc1_latent_proj") else tokens
        out = self.run_experts(latent, weights, ids)
        if hasattr(self, "fc2_latent_proj"):
            out = self.parallel.row_parallel(self.fc2_latent_proj, out, reduce=False)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(tokens, reduce=False)
        return self.parallel.all_reduce(out).view_as(x)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the experts held, accumulated in fp32.
        x [T, De] -> [T, De]; a rank's part of the sum when sharded."""
        if functional_mode():  # an ONNX export: static shapes, each expert's own (quantized) layers
            return self.run_every_expert(x, weights, ids)
        if (self.stacked is not None or self.packed is not None) and use_triton(None, x.device, WHERE):
            return self.run_experts_grouped(x, weights, ids)
        if self.stacked is not None and (ids.numel() <= GATHER_MAX_PAIRS or torch.compiler.is_compiling()):
            if ids.numel() > len(self.experts):  # more pairs than experts: read each expert once instead
                return self.run_experts_dense(x, weights, ids)
            return self.run_experts_gathered(x, weights, ids)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            if str(e) not in self.experts:
                continue
            token, slot = (ids == e).nonzero(as_tuple=True)
            y = self.experts[str(e)](x[token], reduce=False)
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out.to(x.dtype)

    def run_every_expert(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum with every expert held running on every token (unrouted tokens add zeros)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in self.experts.items():
            out += expert(x, reduce=False).float() * (weights * (ids == int(e))).sum(-1, keepdim=True)
        return out.to(x.dtype)

    stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (up [E, I, De], down [E, De, I]) once stacked
    # NVFP4 experts kept packed (the grouped GEMM kernel decodes them): per projection (codes [E, N, K/2],
    # block scales [E, N, K/16], global scales [E])
    packed: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] | None = None
    # per projection (up, down): (format, input scales [E], or the one scale every expert shares as a Python number,
    # a constant of a compiled step's code: ModelOpt calibrates one input quantizer per projection of a layer's
    # experts) when the experts quantize their inputs (W4A4, W8A8)
    stacked_inputs: tuple[tuple[str, torch.Tensor | float] | None, tuple[str, torch.Tensor | float] | None] = (None,
                                                                                                          None)

    def stack_experts(self) -> None:
        """Hold the experts' weights as one [E, I, De] and one [E, De, I] tensor, each expert's weight becoming
        a view of them (names and state dict unchanged), so that a few tokens gather their experts with one
        index (decode; every compiled step) instead of looping over experts, and the grouped GEMM kernel
        (plugins/grouped_gemm.py) runs every (token, expert) pair in one launch. Only when every expert is
        held and its projections are bias-free, either plain nn.Linear or QuantLinear layers of one layout per
        projection: a QuantLinear stacks the dequantized weight it computes with, or, where NVFP4 weights stay
        packed (GPU), its codes and scales (`packed`); its input scales are stacked too (held once when shared).
        Call it after the weights are in place (engines/loading.py does)."""
        experts = list(self.experts.values())
        if len(experts) != self.gate.weight.shape[0]:
            return
        layers, inputs = {}, []
        for name in ("up_proj", "down_proj"):
            layers[name] = [getattr(e, name) for e in experts]
            kind = {_stackable_kind(layer) for layer in layers[name]}
            if len(kind) != 1 or None in kind:
                return
            (kind,) = kind
            inputs.append(None if kind[1] is None else (kind[0], _one_or_each([layer.input_scale
                                                                             for layer in layers[name]])))
        if len({_kept_packed(group[0]) for group in layers.values()}) != 1:
            return
        if _kept_packed(layers["up_proj"][0]):
            self.packed = tuple(_stack_views(group, ("weight", "weight_scale", "weight_scale_2"))
                                for group in layers.values())
        else:
            self.stacked = tuple(_stack_views(group, ("dequantized",) if isinstance(group[0], QuantLinear)
                                              else ("weight",))[0] for group in layers.values())
        self.stacked_inputs = tuple(inputs)

    def _expert_input(self, projection: int, x: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] as the up (0) or down (1) projection of expert `experts` [...] sees it: fake-quantized
        with that expert's input scale when the experts quantize their inputs, else x itself. (`experts` may be
        None where every expert shares the input's scale: `_shared_input`.)"""
        quantized = self.stacked_inputs[projection]
        if quantized is None:
            return x
        weight_format, scales = quantized
        return fake_quantize_input(weight_format, scales if isinstance(scales, float) else scales[experts], x)

    def _shared_input(self, projection: int) -> bool:
        """Whether every expert sees the up (0) or down (1) projection's input alike: unquantized, or quantized
        with one scale (then a token is quantized once, not once per expert)."""
        quantized = self.stacked_inputs[projection]
        return quantized is None or isinstance(quantized[1], float)

    def _pair_inputs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, De] as the up projection of each (token, choice) pair of ids [T, k] sees it: [T*k, De]."""
        k = ids.shape[1]
        if self._shared_input(0):
            return self._expert_input(0, x, None).repeat_interleave(k, dim=0)
        return self._expert_input(0, x.repeat_interleave(k, dim=0), ids.flatten().long())

    def run_experts_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum as two grouped GEMMs over the (token, expert) pairs (plugins/grouped_gemm.py: the Triton
        kernel reads each expert's weight once per tile of its pairs, NVFP4 decoded in registers, relu^2 fused
        into the up projection), then the weighted sum of each token's pairs."""
        T, k = ids.shape
        row_expert = ids.flatten()
        up, down = self.packed or tuple((w, None, None) for w in self.stacked)
        pairs = self._pair_inputs(x, ids)
        h = grouped_gemm(pairs, *up, row_expert=row_expert, relu2=True)
        h = self._expert_input(1, h, row_expert.long())
        y = grouped_gemm(h, *down, row_expert=row_expert).float() * weights.reshape(-1, 1)
        return y.view(T, k, -1).sum(1).to(x.dtype)

    def run_experts_gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum for a few tokens: each (token, choice) pair gathers its expert's weights and one
        batched matmul replaces the loop over experts, whose per-expert overhead dominates small batches."""
        T, k = ids.shape
        up, down = self.stacked
        chosen = ids.flatten().long()
        pairs = self._pair_inputs(x, ids)  # [T*k, De]
        h = F.relu(torch.bmm(up[chosen], pairs[:, :, None])).square()  # [T*k, I, 1]
        h = self._expert_input(1, h.squeeze(-1), chosen)[:, :, None]
        y = torch.bmm(down[chosen], h).squeeze(-1).float() * weights.reshape(-1, 1)
        return y.view(T, k, -1).sum(1).to(x.dtype)

    def run_experts_dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum with every expert applied to every token, weighted 0 where not chosen (static shapes):
        with more (token, choice) pairs than experts, this reads each expert's weights once where gathering
        would copy them once per pair. Only the routed pairs' down inputs are quantized (the others are zeroed: their
        weight is 0)."""
        up, down = self.stacked
        dense = torch.zeros(ids.shape[0], up.shape[0], dtype=torch.float32, device=x.device)
        dense.scatter_(1, ids.long(), weights.float())  # [T, E]
        T, E = dense.shape
        if self._shared_input(0):
            h = F.relu(torch.einsum("td,eid->tei", self._expert_input(0, x, None), up)).square()
        else:  # each expert sees the tokens quantized with its own input scale
            every = torch.arange(E, device=x.device)[:, None].expand(E, T)
            h = F.relu(torch.einsum("etd,eid->tei", self._expert_input(0, x.expand(E, *x.shape), every), up)).square()
        if self.stacked_inputs[1] is not None:
            routed = ids.long()[..., None].expand(T, ids.shape[1], h.shape[-1])  # [T, k, I]
            h = torch.zeros_like(h).scatter_(1, routed, self._expert_input(1, h.gather(1, routed), ids.long()))
        y = torch.einsum("tei,edi->ted", h, down).float() * dense[..., None]
        return y.sum(1).to(x.dtype)


def _stackable_kind(layer: nn.Module) -> tuple[str, str | None] | None:
    """(weight format, input format or None) of an expert projection that can be stacked, else None."""
    if type(layer) is nn.Linear and layer.bias is None:
        return ("bf16", None)
    if isinstance(layer, QuantLinear) and layer.bias is None and not layer.layout.output_scale and (
            layer.dequantized is not None or _kept_packed(layer)):
        return (layer.layout.weight_format, layer.layout.weight_format if layer.layout.input_scale else None)
    return None


def _one_or_each(scales: list[torch.Tensor]) -> torch.Tensor | float:
    """The experts' input scales: the one they share as a Python number, else stacked [E]."""
    if all(torch.equal(scale, scales[0]) for scale in scales):
        return float(scales[0])
    return torch.stack(scales)


def _kept_packed(layer: nn.Module) -> bool:
    return isinstance(layer, QuantLinear) and layer.dequantized is None and layer.layout.weight_format == NVFP4


def _stack_views(layers: list[nn.Module], names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """One stacked tensor [E, ...] per attribute name; each layer's attribute becomes a view of it."""
    stacks = []
    for name in names:
        stack = torch.stack([getattr(layer, name).detach() for layer in layers])
        for layer, view in zip(layers, stack):
            setattr(layer, name, nn.Parameter(view, requires_grad=False) if name == "weight" and
                    type(layer) is nn.Linear else view)
        stacks.append(stack)
    return tuple(stacks)
