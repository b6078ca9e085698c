"""`torch.export` of compiled_step.py's step functions as pure graphs: page table and state pools in, updated
pools out.

`export_step(model, shape)` exports the step of `shape` over a fresh InferenceState of `rows` slots whose block
table and pools are graph inputs:

* "backbone": `backbone_step` (decode T=1, prefill chunks T>1) plus the lm_head: logits [rows, T, V] fp32 and the
  final hidden state [rows, T, D] (what MTP reads);
* "speculative": `speculative_step`, greedy (every row temperature 0: no uniforms, no draft distributions, no
  banned tokens), T = K+1: [rows, 2+K] int64 (accepted, the next token, K drafts).

Inside, the pools are copied and the plugins' ops run as their functional variants (plugins/dispatch.functional_ops),
so the program mutates nothing: each pool input has one output, its updated value, which an engine aliases to the
input (TensorRT's aliased I/O). The block table is read only (the runtime maps pages before a call). Attention
reads every page of the table per row (the static CPU bound of compiled_step.read_pages at its widest; the GPU
kernel skips the pages past each row's length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...plugins.dispatch import functional_ops
from ..network.state import InferenceState
from .compiled_step import backbone_step, speculative_step

TABLE = "pages.table"
STEP_ARGS = {"backbone": ("ids", "slots", "past"), "speculative": ("ids", "num_drafts", "slots", "past")}
STEP_OUTPUTS = {"backbone": ("logits", "hidden.out"), "speculative": ("tokens",)}


@dataclass(frozen=True)
class StepShape:
    step: str  # "backbone" | "speculative"
    rows: int  # sequences per call (the state has as many slots)
    tokens: int  # T, new tokens per row (speculative: K+1)
    max_length: int = 64  # tokens per slot (the block table's width in pages)

    def __post_init__(self):
        if self.step not in STEP_ARGS:
            raise ValueError(f"engines/executors/step_export.py: step {self.step!r} is not one of {', '.join(STEP_ARGS)}")

    @property
    def name(self) -> str:
        return f"{self.step}_r{self.rows}_t{self.tokens}"


def pool_fields(state: InferenceState) -> list[tuple[str, object, str]]:
    """(name, layer entry, attribute) of every state pool, in the order graphs take them."""
    return [(f"{key}.{attr}", entry, attr) for key, entry in state.layers.items()
            for attr, tensor in vars(entry).items() if isinstance(tensor, torch.Tensor)]


def input_names(state: InferenceState, shape: StepShape) -> list[str]:
    return [*STEP_ARGS[shape.step], TABLE, *(name for name, _, _ in pool_fields(state))]


def output_names(state: InferenceState, shape: StepShape) -> list[str]:
    return [*STEP_OUTPUTS[shape.step], *(f"{name}.out" for name, _, _ in pool_fields(state))]


class StepGraph(nn.Module):
    """forward(*step args, block table, *pools) -> (*step outputs, *updated pools); see the module docstring."""

    def __init__(self, model, state: InferenceState, shape: StepShape):
        super().__init__()
        self.model, self.state, self.shape = model, state, shape
        self.n_args, self.fields = len(STEP_ARGS[shape.step]), pool_fields(state)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, table, pools = inputs[:self.n_args], inputs[self.n_args], inputs[self.n_args + 1:]
        pools = [tensor.clone() for tensor in pools]
        for (_, entry, attr), tensor in zip(self.fields, pools):
            setattr(entry, attr, tensor)
        self.state.pages.table = table
        self.state.pages.bound = table.shape[1]
        with functional_ops():
            if self.shape.step == "backbone":
                hidden = backbone_step(self, *args)
                outputs = (self.model.lm_head(hidden).float(), hidden)
            else:
                ids, num_drafts, slots, past = args
                with self.state.recording_steps():
                    outputs = (speculative_step(self, ids, num_drafts, slots, past, torch.zeros_like(past, dtype=torch.float32),
                                                None, None, None, None, None),)
        return (*outputs, *pools)


def example_inputs(model, state: InferenceState, shape: StepShape) -> list[torch.Tensor]:
    """Inputs for `shape`: rows continuing the sequences of slots 0..rows-1 (1 token so far), the state's table and
    pools."""
    dev, rows, T = model.device, shape.rows, shape.tokens
    values = {"ids": torch.zeros(rows, T, dtype=torch.long, device=dev), "slots": torch.arange(rows, device=dev),
              "past": torch.ones(rows, dtype=torch.long, device=dev),
              "num_drafts": torch.full((rows,), T - 1, dtype=torch.long, device=dev)}
    return ([values[name] for name in STEP_ARGS[shape.step]] + [state.pages.table]
            + [getattr(e, a) for _, e, a in pool_fields(state)])


@torch.no_grad()
def export_step(model, shape: StepShape) -> tuple[torch.export.ExportedProgram, InferenceState]:
    """The pure step graph of `shape` (module docstring) and the state whose table and pools it takes."""
    state = model.new_state(shape.rows, shape.max_length, mtp=model.mtp is not None)
    graph = StepGraph(model, state, shape)
    return torch.export.export(graph, tuple(example_inputs(model, state, shape)), strict=False), state
