"""Decode steps compiled once per shape: inductor's fused C++ on CPU, CUDA graphs on GPU.

A decode step (each sequence's last token), a speculative verify (last token + k drafts) and an MTP
draft step have the same shape at every step once the executor pads the batch to max_sequences rows
(padding rows have slot -1: they read and write no sequence's state); a call that starts a sequence (past 0,
whose Mamba state must be zeroed first) runs eagerly. Each (step, T) is compiled once,
with static shapes, as one graph: nothing in the decode path reads tensors back to the host (the
references of plugins/ and the layers' pool writes are branch-free, engines/moe.py gathers the chosen
experts' stacked weights, attention reads the whole slot under a mask). On CUDA the graph is captured
and replayed as a CUDA graph (`mode="reduce-overhead"`), the Triton kernels inside it as opaque custom ops.
Prefill chunks stay eager: their lengths vary.
"""

from __future__ import annotations

import os
import shutil
import types

import torch

from .quant_linear import QuantLinear


class CompiledSteps:
    """Compiled `backbone(ids [B, T], slots [B], past [B]) -> c [B, T, D]` (norm_f applied) and
    `mtp(ids [B, T], hidden [B, T, D], slots, past) -> c' [B, T, D]` over one InferenceState."""

    def __init__(self, model, state):
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            raise ValueError("compiled steps need an unquantized model (the quantized layers of a ModelOpt "
                             "checkpoint emulate their formats eagerly); run it eagerly")
        cuda = model.device.type == "cuda"
        if not cuda and not any(shutil.which(name) for name in (os.environ.get("CXX", "c++"), "g++", "clang++")):
            raise ValueError("compiled steps on CPU need a C++ compiler for torch inductor (none found: set CXX "
                             "or install g++); or run eagerly")
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
        for T in sorted({1, max_tokens}):
            with self.state.recording_steps(T > 1):
                self.backbone(torch.zeros(rows, T, dtype=torch.long, device=dev), slots, past)
        for T in range(1, max_tokens + 1) if self._mtp is not None else ():
            self.mtp(torch.zeros(rows, T, dtype=torch.long, device=dev),
                     torch.zeros(rows, T, model.spec.hidden_size, dtype=model.dtype, device=dev), slots, past)

    def _call(self, step, *args) -> torch.Tensor:
        if self._cuda:  # a CUDA graph's outputs live until the next replay: hand out a copy
            torch.compiler.cudagraph_mark_step_begin()
            return step(self, *args).clone()
        return step(self, *args)


def backbone_step(steps: CompiledSteps, ids, slots, past):
    return steps.model.final_hidden(steps.model(ids, steps.state, slots, past))


def mtp_step(steps: CompiledSteps, ids, hidden, slots, past):
    return steps.model.mtp(steps.model.backbone.embeddings(ids), hidden, steps.state, slots, past)


def own_code(fn):
    """A copy of fn with a code object of its own: dynamo keeps compiled graphs, and its limit of
    recompilations, per code object, so engines built one after another (bench, tests) do not share them."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
