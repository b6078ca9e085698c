"""One compiled step as a `torch.export` program: what the AOT engines (aot_build.py) compile with AOTInductor, and
what other graph targets (ONNX) start from.

`export_step(model, state, shape, bound)` traces the step function compiled_step.STEPS[shape.step] over `state`,
on the example inputs of `compiled_step.example_inputs` (padding rows: nothing of the state is read back to the
host), with the attention reading `bound` pages per row. The program's inputs are the step's tensor arguments
(`StepProgram.inputs`: the step function's parameter names, without those the shape leaves None), then the block
table (`pages.table`), then every state pool (`<layer key>.<field>`, e.g. `backbone.layers.0.conv`), which the
program updates in place (mutated inputs); its one output is the step function's result (`out`). The model's
weights are the program's parameters and constants, under their module paths (`model.<name>`), not inputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .compiled_step import STEPS, StepShape, example_inputs, run_step

TABLE = "pages.table"  # the input name of the block table


@dataclass
class StepProgram:
    program: torch.export.ExportedProgram
    inputs: list[str]  # the program's positional inputs, in order (module docstring)
    outputs: list[str]  # ["out"]


def pool_fields(state) -> list[tuple[str, object, str]]:
    """(input name, layer entry, attribute) of every state pool, in the order step programs take them."""
    return [(f"{key}.{attr}", entry, attr) for key, entry in state.layers.items()
            for attr, tensor in vars(entry).items() if isinstance(tensor, torch.Tensor)]


def pool_tensors(state) -> list[torch.Tensor]:
    """The block table and the state pools, as step programs take them after the step's own inputs."""
    return [state.pages.table, *(getattr(entry, attr) for _, entry, attr in pool_fields(state))]


def argument_names(shape: StepShape, args: list) -> list[str]:
    """The names of the step function's tensor arguments (those `args` does not leave None)."""
    names = list(inspect.signature(STEPS[shape.step]).parameters)[1:]
    return [name for name, arg in zip(names, args) if arg is not None]


class StepGraph(nn.Module):
    """forward(*step tensors, table, *pools) -> out: the step over a state whose block table and pools are the
    inputs. `present[i]`: whether the step's i-th argument is a tensor input (else None)."""

    def __init__(self, model, state, shape: StepShape, present: list[bool]):
        super().__init__()
        self.model, self.state, self.shape, self.present = model, state, shape, present
        self.fields = pool_fields(state)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        given = iter(inputs)
        args = [next(given) if p else None for p in self.present]
        self.state.pages.table = next(given)
        for (_, entry, attr), tensor in zip(self.fields, given):
            setattr(entry, attr, tensor)
        return run_step(self, self.shape.step, *args)


@torch.no_grad()
def export_step(model, state, shape: StepShape, bound: int) -> StepProgram:
    """The ExportedProgram of `shape` over `state` (max_sequences rows), its attention reading `bound` pages per
    row. `state` is left as it was (its pools and block table are restored; padding rows change nothing)."""
    args = example_inputs(model, state, shape)
    present = [a is not None for a in args]
    saved = pool_tensors(state)
    saved_bound = state.pages.bound
    state.pages.bound = bound
    try:
        graph = StepGraph(model, state, shape, present)
        program = torch.export.export(graph, (*(a for a in args if a is not None), *saved), strict=False)
    finally:
        state.pages.table, state.pages.bound = saved[0], saved_bound
        for (_, entry, attr), tensor in zip(pool_fields(state), saved[1:]):
            setattr(entry, attr, tensor)
    inputs = [*argument_names(shape, args), TABLE, *(name for name, _, _ in pool_fields(state))]
    return StepProgram(program, inputs, ["out"])
