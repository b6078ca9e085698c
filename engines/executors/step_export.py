"""One compiled step as a `torch.export` program: what the AOT engines (aot_build.py) compile with AOTInductor, and
what other graph targets (ONNX) start from.

`step_shapes(steps, max_tokens, sampling)` lists the calls compile-at-load compiles (`CompiledSteps.shapes`: THE
declaration of the step functions and their tokens per row) as `StepShape`s, with the sampling variant of the
speculative step if asked. `export_step(model, state, shape, bound)` traces the step function
`compiled_step.<shape.step>` over `state`, on the example inputs of `CompiledSteps.padding_args` (padding rows:
nothing of the state is read back to the host), with the attention reading `bound` pages per row (None: as many as
the block table input has columns, a dynamic dimension). The program's inputs are the step's tensor arguments
(`StepProgram.inputs`: the step function's parameter names, without those the shape leaves None), then the block
table (`pages.table`, with `bound` None sliced to the pages read), then every state pool (`<layer key>.<field>`,
e.g. `backbone.layers.0.conv`), which the program updates in place (mutated inputs); its one output is the step
function's result (`out`). The model's weights are the program's parameters and buffers, under their module paths
(`model.<name>`), not inputs. Tensors a module holds as plain attributes (an MoE layer's stacked experts, a
quantized layer's dequantized weight) are constants of the program, or with `lift_constants` inputs after the pools
(`model.<module path>.<attr>[.<i>]`, `constant_fields`), so that a compiled program can take every weight from the
loaded model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from . import compiled_step
from .compiled_step import SPECULATIVE_PADDING, CompiledSteps

TABLE = "pages.table"  # the input name of the block table
PAGES = "pages"  # the dynamic dimension of a block table input: the pages read per row


@dataclass(frozen=True)
class StepShape:
    """One static-shaped call of a step function, for max_sequences rows."""

    step: str  # the step function's name in compiled_step (backbone_step, prefill_step, speculative_step)
    tokens: int  # tokens per row
    sampling: bool = False  # a speculative step with uniforms and draft_probs (some row samples); else greedy


def step_shapes(steps: CompiledSteps, max_tokens: int, sampling: bool = False) -> list[StepShape]:
    """`steps.shapes(max_tokens)` as StepShapes, plus the sampling speculative step if `sampling`."""
    shapes = [StepShape(fn.__name__, T) for fn, T in steps.shapes(max_tokens)]
    return shapes + [StepShape(s.step, s.tokens, True) for s in shapes if sampling and s.step == "speculative_step"]


def step_function(shape: StepShape):
    return getattr(compiled_step, shape.step)


def example_inputs(steps: CompiledSteps, shape: StepShape) -> list[torch.Tensor | None]:
    """The step's arguments for max_sequences padding rows (CompiledSteps.padding_args), with the uniforms and
    draft_probs of a sampling speculative step."""
    args = list(steps.padding_args(step_function(shape), shape.tokens))
    if shape.sampling:
        rows, K, dev = steps.state.max_sequences, shape.tokens - 1, steps.model.device
        args[7:9] = [torch.full((rows, 2 * K + 1), SPECULATIVE_PADDING[7], device=dev),
                     torch.zeros(rows, K, steps.model.spec.vocab_size, device=dev)]
    return args


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


def constant_fields(model) -> list[tuple[str, nn.Module, str, int | None]]:
    """(input name, module, attribute, index in a tuple or None) of every tensor a module of `model` holds as a
    plain attribute (not a parameter or buffer), alone or in a tuple of tensors."""
    fields = []
    for path, module in model.named_modules(prefix="model"):
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                fields.append((f"{path}.{attr}", module, attr, None))
            elif isinstance(value, tuple) and value and all(isinstance(t, torch.Tensor) for t in value):
                fields += [(f"{path}.{attr}.{i}", module, attr, i) for i in range(len(value))]
    return fields


def constant_tensors(model) -> list[torch.Tensor]:
    """The tensors of `constant_fields`, in their order."""
    return [getattr(m, attr) if i is None else getattr(m, attr)[i] for _, m, attr, i in constant_fields(model)]


def set_constants(fields, tensors) -> None:
    for (_, module, attr, i), tensor in zip(fields, tensors):
        if i is None:
            setattr(module, attr, tensor)
        else:
            value = list(getattr(module, attr))
            value[i] = tensor
            setattr(module, attr, tuple(value))


def argument_names(fn, args: list) -> list[str]:
    """The names of the step function's tensor arguments (those `args` does not leave None)."""
    names = list(inspect.signature(fn).parameters)[1:]
    return [name for name, arg in zip(names, args) if arg is not None]


class StepGraph(nn.Module):
    """forward(*step tensors, table, *pools) -> out: the step over a state whose block table and pools are the
    inputs. `present[i]`: whether the step's i-th argument is a tensor input (else None)."""

    def __init__(self, model, state, shape: StepShape, present: list[bool], constants: list):
        super().__init__()
        self.model, self.state, self.shape, self.present = model, state, shape, present
        self.fields, self.constants = pool_fields(state), constants

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        given = iter(inputs)
        args = [next(given) if p else None for p in self.present]
        self.state.pages.table = next(given)
        for (_, entry, attr), tensor in zip(self.fields, given):
            setattr(entry, attr, tensor)
        set_constants(self.constants, list(given))
        with self.state.recording_steps(self.shape.step == "speculative_step"):  # (as CompiledSteps.speculative)
            return step_function(self.shape)(self, *args)


@torch.no_grad()
def export_step(model, state, shape: StepShape, bound: int | None = None,
                lift_constants: bool = False) -> StepProgram:
    """The ExportedProgram of `shape` over `state` (max_sequences rows), its attention reading `bound` pages per
    row, or with `bound` None as many as the block table input has columns (a dynamic dimension, `PAGES`, from 1
    to the table's width: the caller passes the table sliced to the bound, contiguous); with `lift_constants`, the
    model's plain-attribute tensors are inputs (module docstring). `state` and `model` are left as they were
    (pools, block table and constants restored; padding rows change nothing)."""
    args = example_inputs(CompiledSteps(model, state), shape)
    present = [a is not None for a in args]
    saved, saved_bound = pool_tensors(state), state.pages.bound
    constants = constant_fields(model) if lift_constants else []
    weights = constant_tensors(model) if lift_constants else []
    inputs = (*(a for a in args if a is not None), *saved, *weights)
    dynamic = None
    if bound is None and saved[0].shape[1] > 1:  # (a table of one column: one bound, static)
        pages = {1: torch.export.Dim(PAGES, min=1, max=saved[0].shape[1])}
        dynamic = (tuple(pages if i == sum(present) else None for i in range(len(inputs))),)  # (forward(*inputs))
    state.pages.bound = bound
    try:
        graph = StepGraph(model, state, shape, present, constants)
        program = torch.export.export(graph, inputs, dynamic_shapes=dynamic, strict=False)
    finally:
        state.pages.table, state.pages.bound = saved[0], saved_bound
        for (_, entry, attr), tensor in zip(pool_fields(state), saved[1:]):
            setattr(entry, attr, tensor)
        set_constants(constants, weights)
    inputs = [*argument_names(step_function(shape), args), TABLE, *(name for name, _, _ in pool_fields(state)),
              *(name for name, *_ in constants)]
    return StepProgram(program, inputs, ["out"])
