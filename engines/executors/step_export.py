"""`torch.export` of compiled_step.py's step functions as pure graphs: state pools in, updated pools out.

`export_step(model, step, rows, T, ...)` exports `step_graph(...)`: the step function (`backbone_step`: decode T=1,
verify T=k+1, prefill chunks T>MAX_STEP_TOKENS; `mtp_step`) over a fresh InferenceState of `rows` slots whose pools
are graph inputs, plus the lm_head (logits for every row, fp32). Inside, the pools are copied and the plugins' ops
run as their functional variants (plugins/dispatch.functional_ops), so the program mutates nothing: each pool input
has one output, its updated value, which an engine aliases to the input (TensorRT's aliased I/O). A recording step
(speculative verify) also returns each Mamba layer's conv and SSM states after every token.

Outputs, in order: logits [rows, T, V] fp32, hidden.out [rows, T, D] (norm_f's output; an MTP step's c'), the updated pools (`pool_names` order), then for a
recording step `<layer>.conv_steps`, `<layer>.ssm_steps` per Mamba layer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ...plugins.dispatch import functional_ops
from ..network.state import InferenceState, MambaState
from .compiled_step import STEPS


@dataclass(frozen=True)
class StepShape:
    step: str  # a name in compiled_step.STEPS
    rows: int  # sequences per call (the state has as many slots)
    tokens: int  # T, new tokens per row
    record: bool = False  # keep the Mamba states after every token (speculative verify)
    max_length: int = 64  # tokens per slot of the attention caches

    @property
    def name(self) -> str:
        return f"{self.step}_r{self.rows}_t{self.tokens}{'_record' if self.record else ''}"


def step_args(step: str) -> list[str]:
    """The tensor arguments of STEPS[step] after `steps` (the object holding the model and the state)."""
    return list(inspect.signature(STEPS[step]).parameters)[1:]


def pool_fields(state: InferenceState) -> list[tuple[str, object, str]]:
    """(name, layer entry, attribute) of every state pool, in the order graphs take them."""
    return [(f"{key}.{attr}", entry, attr) for key, entry in state.layers.items()
            for attr, tensor in vars(entry).items() if isinstance(tensor, torch.Tensor)]


def recorded_names(state: InferenceState) -> list[str]:
    return [f"{key}.{kind}_steps" for key, entry in state.layers.items() if isinstance(entry, MambaState)
            for kind in ("conv", "ssm")]


class StepGraph(nn.Module):
    """forward(*step args, *pools) -> (logits, hidden, *updated pools, *recorded states); see the module docstring."""

    def __init__(self, model, state: InferenceState, shape: StepShape):
        super().__init__()
        self.model, self.state, self.shape = model, state, shape
        self.n_args, self.fields = len(step_args(shape.step)), pool_fields(state)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pools = [tensor.clone() for tensor in inputs[self.n_args:]]
        for (_, entry, attr), tensor in zip(self.fields, pools):
            setattr(entry, attr, tensor)
        with functional_ops(), self.state.recording_steps(self.shape.record):
            out = STEPS[self.shape.step](self, *inputs[:self.n_args])
            recorded = [t for entry in self.state.mamba_layers() if entry.steps for t in entry.steps[-1][1:]]
        return (self.model.lm_head(out).float(), out, *pools, *recorded)


def example_inputs(model, state: InferenceState, shape: StepShape) -> list[torch.Tensor]:
    """Inputs for `shape`: rows continuing the sequences of slots 0..rows-1 (1 token so far), the state's pools."""
    dev, rows, T = model.device, shape.rows, shape.tokens
    values = {"ids": torch.zeros(rows, T, dtype=torch.long, device=dev),
              "hidden": torch.zeros(rows, T, model.spec.hidden_size, dtype=model.dtype, device=dev),
              "slots": torch.arange(rows, device=dev), "past": torch.ones(rows, dtype=torch.long, device=dev)}
    return [values[name] for name in step_args(shape.step)] + [getattr(e, a) for _, e, a in pool_fields(state)]


def input_names(state: InferenceState, shape: StepShape) -> list[str]:
    return [*step_args(shape.step), *(name for name, _, _ in pool_fields(state))]


def output_names(state: InferenceState, shape: StepShape) -> list[str]:
    return ["logits", "hidden.out", *(f"{name}.out" for name, _, _ in pool_fields(state)),
            *(recorded_names(state) if shape.record else [])]


@torch.no_grad()
def export_step(model, shape: StepShape) -> tuple[torch.export.ExportedProgram, InferenceState]:
    """The pure step graph of `shape` (module docstring) and the state whose pools it takes."""
    state = model.new_state(shape.rows, shape.max_length, mtp=model.mtp is not None)
    graph = StepGraph(model, state, shape)
    return torch.export.export(graph, tuple(example_inputs(model, state, shape)), strict=False), state
