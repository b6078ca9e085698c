"""Decode steps compiled once per shape: inductor's fused C++ on CPU, CUDA graphs on GPU.

A decode step (each sequence's last token), a speculative verify (last token + k drafts) and an MTP
draft step have the same shape at every step once the executor pads the batch to max_sequences rows
(padding rows have slot -1: they read and write no sequence's state); a decode call that starts a sequence (past 0)
finds its Mamba state zeroed by the executor before the call. Prefill chunks of more than MAX_STEP_TOKENS tokens run
compiled too, right-padded to the next of `prefill_tokens` (per row `lengths`: the padding leaves no state behind,
and a starting row's Mamba state is zeroed in-graph, branch-free). `CompiledSteps.shapes` declares every (step, T),
in one place. Each (step, T) is compiled once,
with static shapes, as one graph: nothing in the decode path reads tensors back to the host (the
references of plugins/ and the layers' pool writes are branch-free, engines/moe.py runs its stacked
experts gathered or dense, attention reads pages through the block table). Quantized layers (ModelOpt
checkpoints) compile too, with the numerics of the eager network: their dequantized weights are frozen
into the graph like any weight (W4A16, W8A16), and the fake quantization of W4A4 / W8A8 inputs and of
FP8 K/V outputs is branch-free torch code that inductor fuses into the graph. On CUDA the graph is captured
and replayed as a CUDA graph (`mode="reduce-overhead"`), the Triton kernels inside it as opaque custom ops;
the paged attention kernel reads only the pages of each row's real length. On CPU the attention reference
reads a static number of pages per row, so each step is compiled once per bound (`read_pages`: the next power
of two of the pages the batch's longest row has): a step's cost follows the real lengths, within a factor 2.

Each compiled step (step, pages read, argument shapes) has a code object of its own, so dynamo holds one graph for
it; after its first call (which traces, compiles and checks dynamo's guards) it runs without guard evaluation
(`skip_guard_eval_unsafe`): the key already fixes everything the guards would check, and checking them cost a
third of a CPU speculative step.
"""

from __future__ import annotations

import os
import shutil
import types

import torch
from torch import nn

from ...export.kv_pages import pages_for
from ...plugins.dispatch import next_power_of_2
from ...plugins.pool_rows import write_rows
from ...quant.layout import BF16
from ..network.mamba2 import MAX_STEP_TOKENS
from ..network.quant_linear import QuantLinear
from ..network.token_choice import accept_drafts, distributions, sample

# tokens per row that prefill chunks are padded to (each > MAX_STEP_TOKENS: the chunked scan); a longer chunk, or a
# chunk of 2 .. MAX_STEP_TOKENS tokens, runs eagerly
PREFILL_TOKENS = (16, 64, 256)
# a padding row's value in each of speculative_step's arguments ids .. uniforms: slot -1, greedy, nothing to verify
SPECULATIVE_PADDING = (0, 0, -1, 0, 0.0, 0, 1.0, 0.0)


class CompiledSteps:
    """Compiled `backbone(ids [B, T], slots [B], past [B], lengths [B] | None) -> c [B, T, D]` (norm_f applied:
    the decode step, T = 1, or a prefill chunk, T in prefill_tokens) and `speculative(...)` (one MTP step: verify,
    accept, roll back, draft; see `speculative_step`) over one InferenceState. (The MTP head over T positions runs
    eagerly: only a prompt's MTP pass calls it.)"""

    def __init__(self, model, state, prefill_tokens: tuple[int, ...] = PREFILL_TOKENS):
        if any(T <= MAX_STEP_TOKENS for T in prefill_tokens):
            raise ValueError(f"prefill_tokens={prefill_tokens}: each must exceed {MAX_STEP_TOKENS} (shorter calls run "
                             f"the decode ops)")
        why = not_traceable(model)
        if why:
            raise ValueError(f"compiled steps: {why}; run it eagerly")
        cuda = model.device.type == "cuda"
        self.model, self.state = model, state
        if cuda:  # the pools (and the block table) are updated in place by every replay, at fixed addresses
            for entry in state.layers.values():
                for tensor in vars(entry).values():
                    if isinstance(tensor, torch.Tensor):
                        torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static_address(state.pages.table)
        # CPU: weights frozen into the graph (prepacked for oneDNN) and a C++ wrapper around the kernels
        self._options = dict(dynamic=False, fullgraph=True, **(dict(mode="reduce-overhead") if cuda else
                                                               dict(options={"freezing": True, "cpp_wrapper": True})))
        # (step, pages read per row, argument shapes) -> compiled step
        self._compiled: dict[tuple[str, int, tuple], object] = {}
        # (no chunk holds more than max_length tokens: the shapes up to the first that holds max_length)
        fits_all = min((T for T in prefill_tokens if T >= state.max_length), default=None)
        self.prefill_tokens = tuple(T for T in sorted(prefill_tokens) if T < state.max_length or T == fits_all)
        self._has_mtp = model.mtp is not None
        self._cuda = cuda
        self.read_pages(1)

    def read_pages(self, tokens: int) -> None:
        """Make the next calls' attention read enough pages per row for `tokens` tokens (the batch's longest row,
        every position the call writes or reads included): on CPU the next power of two of their pages (one
        compiled graph per bound), on CUDA the whole block table (the kernel skips pages past each row's length)."""
        width = self.state.pages.table.shape[1]
        need = next_power_of_2(pages_for(tokens, self.state.pages.page_size))
        self.state.pages.bound = width if self._cuda else min(width, need)

    def shapes(self, max_tokens: int) -> tuple[tuple[object, int], ...]:
        """THE declaration of the compiled steps: (step function, tokens per row T) for every shape the runtime calls
        compiled, when its speculative steps carry up to `max_tokens` tokens per row: the decode step, the prefill
        chunks, the greedy speculative step (a model with MTP, max_tokens > 1). Rows are max_sequences; each step's
        arguments are shaped as `padding_args(step, T)`. warm_up compiles exactly these."""
        steps = ((backbone_step, 1),) + tuple((prefill_step, T) for T in self.prefill_tokens)
        if self._has_mtp and max_tokens > 1:
            steps += ((speculative_step, max_tokens),)
        return steps

    def padding_args(self, step, T: int) -> tuple:
        """`step`'s arguments (after the CompiledSteps) for max_sequences padding rows of T tokens (slot -1: nothing
        is read or written): example inputs of the declared shape. (Distinct tensors: dynamo guards on aliasing.)"""
        rows, dev = self.state.max_sequences, self.model.device
        ids = torch.zeros(rows, T, dtype=torch.long, device=dev)
        slots, past = torch.full((rows,), -1, device=dev), torch.zeros(rows, dtype=torch.long, device=dev)
        if step is backbone_step:
            return ids, slots, past
        if step is prefill_step:
            return ids, slots, past, past.clone()
        return (ids, *(torch.full((rows,), v, device=dev) for v in SPECULATIVE_PADDING[1:7]), None, None, None)

    def chunk_tokens(self, T: int) -> int | None:
        """The tokens per row a backbone call of T tokens per row runs compiled with (padded), or None: eagerly."""
        if T == 1:
            return 1
        fits = [P for P in self.prefill_tokens if P >= T]
        return fits[0] if fits and T > MAX_STEP_TOKENS else None

    def backbone(self, ids: torch.Tensor, slots: torch.Tensor, past: torch.Tensor,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step (T = 1, lengths None: every row continues its sequence) or a prefill chunk (lengths)."""
        if lengths is None:
            return self._call(backbone_step, ids, slots, past)
        return self._call(prefill_step, ids, slots, past, lengths)

    def speculative(self, *args) -> torch.Tensor:
        with self.state.recording_steps():
            return self._call(speculative_step, *args)

    @torch.inference_mode()
    def warm_up(self, max_tokens: int) -> None:
        """Compile every declared shape (`shapes`), on batches of padding rows only (no state changes), reading one
        page per row (a prefill chunk: the pages of its T tokens, as a chunk that starts a sequence). Without it each
        compiles when the runtime first meets it; so do a speculative step of another draft length, the sampling
        speculative step (at the first sampled request with MTP) and each larger bound on the pages read (CPU)."""
        for step, T in self.shapes(max_tokens):
            self.read_pages(T if step is prefill_step else 1)
            if step is speculative_step:
                self.speculative(*self.padding_args(step, T))
            else:
                self._call(step, *self.padding_args(step, T))

    def _call(self, fn, *args) -> torch.Tensor:
        key = (fn.__name__, self.state.pages.bound, tuple(None if a is None else (*a.shape, a.dtype) for a in args))
        step = self._compiled.get(key)
        if step is None:  # the first call traces and compiles, checking dynamo's guards
            hold_constants_as_parameters(self.model)
            step = self._compiled[key] = torch.compile(own_code(fn), **self._options)
            out = self._run(step, args)
        else:  # its code object holds this one graph, for these shapes: skip the guards (module docstring)
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out = self._run(step, args)
        return out

    def _run(self, step, args) -> torch.Tensor:
        if not self._cuda:
            return step(self, *args)
        # a CUDA graph's outputs live until the next replay, and one forward may replay several graphs: hand out
        # copies
        torch.compiler.cudagraph_mark_step_begin()
        return step(self, *args).clone()


def unsupported(model) -> str | None:
    """Why `model` cannot run compiled steps on its device, or None if it can."""
    if model.parallel.sharded:
        return ("a tensor-parallel rank runs eagerly (compile-at-load with collectives is not verified; a --tp build's "
                "ahead-of-time engines are)")
    return not_traceable(model)


def not_traceable(model) -> str | None:
    """Why `model`'s steps cannot be traced into a graph (compiled or exported) on its device, or None if they can."""
    from ..network.moe import MoE

    if any(isinstance(m, QuantLinear) and m.layout.weight_format != BF16 and m.dequantized is None
           and not m.runs_packed for m in model.modules()):
        return "a quantized layer's weight is not dequantized (prepare_quant_linears was not called)"
    if any(isinstance(m, MoE) and m.stacked is None and m.packed is None for m in model.modules()):
        return ("an MoE layer's experts are not stacked (expert-sharded, or a Model not built by "
                "engines/loading.py); compiled steps gather stacked experts")
    if model.device.type == "cpu" and cpp_compiler() is None:
        return "torch inductor needs a C++ compiler on CPU and none was found (set CXX or install g++)"
    return None


def hold_constants_as_parameters(model) -> None:
    """Make each tensor the network reads and never writes that is not a Parameter yet (buffers: quantization scales,
    dequantized weights, router biases; the MoE layers' stacked experts and input scales) an `nn.Parameter` object
    without grad, held where it was: a buffer stays a buffer (names, state dict and persistence unchanged), storage
    shared. Dynamo checks every plain tensor a compiled step reads on every call, even with skip_guard_eval_unsafe
    (its metadata, and that it aliases no other input), but not Parameters, which it takes for the model's weights: a
    quantized build reads ~90 such tensors per step, whose checks cost as much as a tenth of its decode step. Done before
    a step first compiles (not for the exported programs of step_export.py, which take the model as loaded)."""
    from ..network.moe import MoE

    def parameter(t):
        return t if t is None or isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)

    for module in model.modules():
        for name, t in module._buffers.items():
            module._buffers[name] = parameter(t)
        if isinstance(module, MoE):
            if module.stacked is not None:
                module.stacked = tuple(map(parameter, module.stacked))
            if module.packed is not None:
                module.packed = tuple(tuple(map(parameter, projection)) for projection in module.packed)
            module.stacked_inputs = tuple(s if s is None or isinstance(s[1], float) else (s[0], parameter(s[1]))
                                          for s in module.stacked_inputs)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would find on CPU ($CXX, c++, g++, clang++), or None."""
    return next(filter(None, map(shutil.which, (os.environ.get("CXX", "c++"), "g++", "clang++"))), None)


def backbone_step(steps: CompiledSteps, ids, slots, past):
    return steps.model.final_hidden(steps.model(ids, steps.state, slots, past))


def prefill_step(steps: CompiledSteps, ids, slots, past, lengths):
    """A prefill chunk: ids [B, T] right-padded, row b's first lengths[b] tokens real (past 0: it starts its
    sequence; the chunked scan reads a zero state for it)."""
    return steps.model.final_hidden(steps.model(ids, steps.state, slots, past, lengths))


def speculative_step(steps: CompiledSteps, ids, num_drafts, slots, past, temperature, top_k, top_p, uniforms,
                     draft_probs, banned):
    """One MTP speculative step ("one-model", as TensorRT-LLM runs MTP), inside `state.recording_steps`.

    ids [B, K+1]: each row's last token, then its drafts y_0.. (the first num_drafts[b] real, the rest padding;
    num_drafts 0: a plain decode row); past [B] > 0: the backbone's and the MTP's past length; sampling
    parameters per row (`engines/network/token_choice.py`); uniforms [B, 2K+1] (acceptance tests, the next
    token's draw, the drafts' draws) and draft_probs [S, K, V] (by slot: the q each draft was drawn from, read
    for verifying and written for the next step), both None when every row is greedy; banned [B, K+1, V] bool:
    tokens a verify position may not choose (min_tokens holding back stop ids), or None.

    Verifies the drafts, accepts in-graph, keeps the Mamba states of the last accepted input, runs the MTP
    head over positions past .. past+K (x_{t+1}: the accepted drafts, then the next token; positions after
    it are overwritten before any query reads them) and drafts K tokens from position past+accepted.
    Returns [B, 2+K] int64: accepted (-1: the row's sampling distribution is not finite), the token after the
    accepted drafts, the K new drafts: one host read.
    """
    model, state = steps.model, steps.state
    K = ids.shape[1] - 1
    c = model.final_hidden(model(ids, state, slots, past))
    logits = model.lm_head(c).float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    greedy = temperature == 0
    if uniforms is None:
        accepted, token = accept_drafts(logits, ids[:, 1:], num_drafts, greedy, None, None)
    else:
        target = distributions(logits, temperature, top_k, top_p)
        accepted, token = accept_drafts(target, ids[:, 1:], num_drafts, greedy, draft_probs[slots.clamp(min=0)],
                                        uniforms[:, :K + 1])
    accepted = accepted.long()
    state.keep_recorded(accepted)
    position = torch.arange(K + 1, device=ids.device)
    after = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # x_{t+1} of position t while t is an accepted draft's input
    mtp_ids = torch.where(position < accepted[:, None], after, token[:, None])
    embed = model.backbone.embeddings
    h = model.mtp(embed(mtp_ids), c, state, slots, past)
    last = h.gather(1, accepted[:, None, None].expand(-1, 1, h.shape[-1]))
    drafts, probs = [], []
    for j in range(K):
        draft_logits = model.lm_head(last[:, 0]).float()
        if uniforms is None:
            drafts.append(draft_logits.argmax(-1))
        else:
            probs.append(distributions(draft_logits, temperature, top_k, top_p))
            drafts.append(sample(probs[-1], uniforms[:, K + 1 + j]))
        if j + 1 < K:
            last = model.mtp(embed(drafts[-1][:, None]), last, state, slots, past + accepted + 1 + j)
    if uniforms is not None:
        write_rows(draft_probs, slots, torch.stack(probs, 1))
        # a row whose distribution is not finite reports accepted -1: its request fails
        accepted = torch.where(torch.isfinite(target).flatten(1).all(-1), accepted, -1)
    return torch.cat([accepted[:, None], token[:, None], torch.stack(drafts, 1)], 1)


def own_code(fn):
    """A copy of fn with a code object of its own: dynamo keeps compiled graphs, and its limit of
    recompilations, per code object, so engines built one after another (bench, tests) do not share them."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
