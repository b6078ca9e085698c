"""Decode steps compiled once per shape: inductor's fused C++ on CPU, CUDA graphs on GPU.

A decode step (each sequence's last token), a speculative verify (last token + k drafts) and an MTP
draft step have the same shape at every step once the executor pads the batch to max_sequences rows
(padding rows have slot -1: they read and write no sequence's state); a call that starts a sequence (past 0,
whose Mamba state must be zeroed first) runs eagerly. Each (step, T) is compiled once,
with static shapes, as one graph: nothing in the decode path reads tensors back to the host (the
references of plugins/ and the layers' pool writes are branch-free, engines/moe.py runs its stacked
experts gathered or dense, attention reads the whole slot under a mask). On CUDA the graph is captured
and replayed as a CUDA graph (`mode="reduce-overhead"`), the Triton kernels inside it as opaque custom ops.
Prefill chunks stay eager: their lengths vary.
"""

from __future__ import annotations

import os
import shutil
import types

import torch

from ..network.quant_linear import QuantLinear


class CompiledSteps:
    """Compiled `backbone(ids [B, T], slots [B], past [B]) -> c [B, T, D]` (norm_f applied) and
    `mtp(ids [B, T], hidden [B, T, D], slots, past) -> c' [B, T, D]` over one InferenceState."""

    def __init__(self, model, state):
        why = unsupported(model)
        if why:
            raise ValueError(f"compiled steps: {why}; run it eagerly")
        cuda = model.device.type == "cuda"
        self.model, self.state = model, state
        if cuda:  # the pools are updated in place by every replay, at fixed addresses
            for entry in state.layers.values():
                for tensor in vars(entry).values():
                    if isinstance(tensor, torch.Tensor):
                        torch._dynamo.mark_static_address(tensor)
        # CPU: weights frozen into the graph (prepacked for oneDNN) and a C++ wrapper around the kernels
        options = dict(dynamic=False, fullgraph=True, **(dict(mode="reduce-overhead") if cuda else
                                                         dict(options={"freezing": True, "cpp_wrapper": True})))
        self._backbone = torch.compile(own_code(backbone_step), **options)
        self._mtp = torch.compile(own_code(mtp_step), **options) if model.mtp is not None else None
        self._cuda = cuda
        self.max_tokens = 1  # backbone calls of 1 or max_tokens tokens per row, MTP calls of up to max_tokens

    def covers(self, T: int, mtp: bool = False) -> bool:
        """Whether a call of T tokens per row runs compiled (other shapes, prefill chunks, run eagerly)."""
        return T <= self.max_tokens if mtp else T in (1, self.max_tokens)

    def backbone(self, ids: torch.Tensor, slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self._call(self._backbone, ids, slots, past)

    def mtp(self, ids: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self._call(self._mtp, ids, hidden, slots, past)

    @torch.inference_mode()
    def warm_up(self, max_tokens: int) -> None:
        """Compile every shape a run can meet, on batches of padding rows only (no state changes): the decode
        step (T=1), the verify of max_tokens-1 drafts (T=max_tokens, recording the Mamba states) and MTP calls
        of 1..max_tokens tokens. Without it each shape compiles when the runtime first meets it."""
        self.max_tokens = max_tokens
        model, rows = self.model, self.state.max_sequences
        dev = model.device
        slots, past = torch.full((rows,), -1, device=dev), torch.zeros(rows, dtype=torch.long, device=dev)
        # a verify records the Mamba states; so does a decode (T=1) batched with another request's verify
        for T, record in [(1, False)] + ([(1, True), (max_tokens, True)] if max_tokens > 1 else []):
            with self.state.recording_steps(record):
                self.backbone(torch.zeros(rows, T, dtype=torch.long, device=dev), slots, past)
        for T in range(1, max_tokens + 1) if self._mtp is not None else ():
            self.mtp(torch.zeros(rows, T, dtype=torch.long, device=dev),
                     torch.zeros(rows, T, model.spec.hidden_size, dtype=model.dtype, device=dev), slots, past)

    def _call(self, step, *args) -> torch.Tensor:
        if not self._cuda:
            return step(self, *args)
        # a CUDA graph's outputs (the hidden states, and the Mamba states a verify records) live until the
        # next replay, and one forward may replay several graphs: hand out copies
        torch.compiler.cudagraph_mark_step_begin()
        out = step(self, *args).clone()
        for entry in self.state.mamba_layers():
            if entry.steps:
                entry.steps[-1] = tuple(t.clone() for t in entry.steps[-1])
        return out


def unsupported(model) -> str | None:
    """Why `model` cannot run compiled steps on its device, or None if it can."""
    from ..network.moe import MoE

    if model.parallel.sharded:
        return "a tensor-parallel rank runs eagerly (compiled steps with collectives are not verified)"
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return ("the model is quantized (the layers of a ModelOpt checkpoint emulate their formats eagerly); "
                "compiled steps need an unquantized one")
    if any(isinstance(m, MoE) and m.stacked is None for m in model.modules()):
        return ("an MoE layer's experts are not stacked (expert-sharded, or a Model not built by "
                "engines/loading.py); compiled steps gather stacked experts")
    if model.device.type == "cpu" and cpp_compiler() is None:
        return "torch inductor needs a C++ compiler on CPU and none was found (set CXX or install g++)"
    return None


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would find on CPU ($CXX, c++, g++, clang++), or None."""
    return next(filter(None, map(shutil.which, (os.environ.get("CXX", "c++"), "g++", "clang++"))), None)


def backbone_step(steps: CompiledSteps, ids, slots, past):
    return steps.model.final_hidden(steps.model(ids, steps.state, slots, past))


def mtp_step(steps: CompiledSteps, ids, hidden, slots, past):
    return steps.model.mtp(steps.model.backbone.embeddings(ids), hidden, steps.state, slots, past)


STEPS = {"backbone": backbone_step, "mtp": mtp_step}  # the step functions, by the names step_shapes uses


def own_code(fn):
    """A copy of fn with a code object of its own: dynamo keeps compiled graphs, and its limit of
    recompilations, per code object, so engines built one after another (bench, tests) do not share them."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
