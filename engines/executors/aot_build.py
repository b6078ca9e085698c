"""Ahead-of-time engines: the step calls compile-at-load compiles (compiled_step.step_shapes), exported by
step_export.py and compiled by AOTInductor into `OUT/engines/` (the `engines` stage of nemo3-build; aot_executor.py
runs them).

Each StepShape becomes one package per rank, `rank<r>/<step>_t<T>[_sampling].pt2`: max_sequences rows (the runtime
pads decode, prefill-chunk and speculative calls to that many rows, padding rows with slot -1), and a dynamic number
of pages read per row, from 1 to the block table's width: the executor passes the block table sliced to the call's bound
(`CompiledSteps.read_pages`), so one package serves every bound as fast as one package per bound (README,
"Ahead-of-time engines"). A package holds code, no weights: the model's parameters and buffers are AOTInductor
constants kept out of the package (`package_constants_in_so=False`) that the executor points at the served model's
tensors (user-managed), and its plain-attribute tensors (stacked experts, dequantized weights) are inputs; the state
pools are inputs updated in place, so the runtime keeps its one InferenceState (prefill chunks, which run eagerly,
see what the engines wrote). Not frozen, unlike compile-at-load: freezing would fold (copy) the weights into each
package. On CPU the Triton kernels' plain-torch references are traced in (plugins/dispatch.py).

A --tp N > 1 build compiles each rank's steps from its per-rank weights (OUT/ranks), one rank after another in this
process, inside a stand-in process group of the rank's place (torch.distributed's "fake" backend: AOTInductor looks
the group up while compiling, and nothing is communicated): the network's collectives are functional ones traced by
the process group's name (engines/network/parallel.py), that of the default group every rank of a serving stack
joins (DEFAULT_GROUP, in the manifest), and the package runs them in that group. Each rank has its own packages:
the ranks' graphs differ in constants (the vocabulary range, which rank adds the row-parallel biases). A rank
compiles the shapes a tp 1 build does (decode, prefill chunks, the greedy and the sampling speculative step). The
sampling step draws nothing itself: its randomness is its `uniforms` input, which the leader broadcasts to every rank
with the call (distributed.py), and the logits it samples from are all-gathered, so every rank accepts and drafts the
same tokens and its state stays the leader's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...export.kv_pages import DEFAULT_PAGE_SIZE
from ..network.parallel import DEFAULT_GROUP, SINGLE, Parallel
from .aot_manifest import EngineEntry, Manifest, host_arch
from .compiled_step import PREFILL_TOKENS, CompiledSteps, not_traceable
from .step_export import StepShape, export_step, stand_in_group, step_shapes

# no precompiled headers: inductor keeps them in one machine-wide folder ($TMPDIR/torchinductor_$USER) whatever the
# cache dir, which concurrent builds on a shared machine can remove under each other
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False, "aot_inductor.precompile_headers": False}


@dataclass(frozen=True)
class EngineTarget:
    device: str = "cpu"
    max_sequences: int = 16
    max_length: int = 256  # tokens per sequence: the most pages read per row are its pages
    draft_tokens: int = 2  # MTP draft length served (0: the decode step only)
    sampling: bool = True  # also the sampling speculative step (else sampled MTP requests run it eagerly)
    prefill_tokens: tuple[int, ...] = PREFILL_TOKENS  # prefill chunk lengths (CompiledSteps keeps those that fit)
    page_size: int = DEFAULT_PAGE_SIZE


def build_engines(source: Path, out: Path, target: EngineTarget, ranks: Path | None = None,
                  skipped: str | None = None, log=print) -> dict:
    """Compile the engines of the checkpoint `source` (what serving loads: a build's checkpoint/) into `out`, with
    manifest.json; returns the stage's summary. `ranks`: a --tp N > 1 build's per-rank weights (OUT/ranks), whose
    ranks' engines are compiled instead. A model that cannot be exported, or a build that `skipped` them (the
    reason), gets a manifest saying why."""
    from ...export.checkpoint import open_checkpoint
    from ..network.loading import load, load_rank, read_rank_config

    parallels = [SINGLE]
    if ranks is not None:
        config = read_rank_config(ranks)[1]
        parallels = [Parallel(config["world_size"], r, config["moe_parallel"]) for r in range(config["world_size"])]
    manifest = Manifest(device=torch.device(target.device).type, arch=host_arch(target.device),
                        torch=torch.__version__, dtype=None, max_sequences=target.max_sequences,
                        max_length=target.max_length, page_size=target.page_size,
                        fingerprint=open_checkpoint(source).fingerprint(),
                        unsupported=skipped or not_built_yet(target.device), tp=len(parallels),
                        group=DEFAULT_GROUP if len(parallels) > 1 else None)
    for parallel in parallels if manifest.unsupported is None else []:  # (a model without engines is not loaded)
        model = (load(source, device=target.device) if ranks is None else
                 load_rank(ranks, parallel, target.device))
        manifest.dtype = str(model.dtype).removeprefix("torch.")
        manifest.unsupported = not_traceable(model)
        if manifest.unsupported is not None:
            manifest.engines = []
            break
        state = model.new_state(target.max_sequences, target.max_length, mtp=model.mtp is not None,
                                page_size=target.page_size)
        steps = CompiledSteps(model, state, target.prefill_tokens)
        manifest.prefill_tokens = list(steps.prefill_tokens)
        with stand_in_group(parallel):
            manifest.engines += [_compile(model, state, shape, out, parallel.rank, log)
                                 for shape in step_shapes(steps, 1 + target.draft_tokens, target.sampling)]
    manifest.write(out)
    return {"engines": len(manifest.engines), "arch": manifest.arch, "unsupported": manifest.unsupported,
            "bytes": sum(f.stat().st_size for f in out.rglob("*.pt2"))}


def not_built_yet(device: str) -> str | None:
    """Why engines for `device` are not built, whatever the model, or None."""
    if torch.device(device).type == "cuda":  # (no GPU was available to this work)
        return ("--engine-device cuda: not built yet (the Triton kernels must become torch.library.triton_op to be "
                "compiled into a package; as custom ops they stay Python callbacks); serving compiles CUDA graphs "
                "at load")
    return None


def package_name(shape: StepShape, rank: int) -> str:
    return f"rank{rank}/{shape.step}_t{shape.tokens}{'_sampling' if shape.sampling else ''}.pt2"


@torch.no_grad()
def _compile(model, state, shape: StepShape, out: Path, rank: int, log) -> EngineEntry:
    step = export_step(model, state, shape, lift_constants=True)
    file = package_name(shape, rank)
    (out / file).parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(step.program, package_path=str(out / file),
                                             inductor_configs=INDUCTOR_CONFIGS)
    log(f"[engines] {file}")
    return EngineEntry(file=file, step=shape.step, tokens=shape.tokens, sampling=shape.sampling,
                       max_pages=state.pages.table.shape[1], inputs=step.inputs, outputs=step.outputs, rank=rank)
