"""Ahead-of-time engines: the step functions compiled_step.py compiles at load, exported with `torch.export` and
compiled by AOTInductor into `OUT/engines/` (the `engines` stage of nemo3-build; aot_executor.py runs them).

Each (step, T, record) of `compiled_step.step_shapes` becomes one package, `rank0/<step>_t<T>[_record].pt2`, of
static shape: max_sequences rows (the runtime pads decode, verify and MTP calls to that many rows, padding rows
with slot -1) of T tokens. The model's weights are constants inside the package; the state pools are inputs,
updated in place, so the runtime keeps its one InferenceState (prefill chunks, which run eagerly, and
`commit_steps` see what the engines wrote). A recording engine (speculative verify) also returns, per Mamba
layer, the conv and SSM states after each token, which the executor hands to the state's recording.

On CPU the Triton kernels' plain-torch references are traced into the graph (plugins/dispatch.py), so a package
needs nothing of nemo3 to run. Prefill chunks are not exported: their length varies, and torch.export specializes
the chunked scan (network/ssd.py, which pads T to whole chunks) to the example's length when T is made dynamic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..network.state import InferenceState, MambaState
from .aot_manifest import EngineEntry, Manifest, host_arch
from .compiled_step import STEPS, step_shapes, unsupported

# weights folded into the graph (prepacked GEMMs on CPU), as compiled_step does; no precompiled headers: inductor
# keeps them in one machine-wide folder ($TMPDIR/torchinductor_$USER) whatever the cache dir, which concurrent
# builds on a shared machine can remove under each other
INDUCTOR_CONFIGS = {"freezing": True, "aot_inductor.precompile_headers": False}


@dataclass(frozen=True)
class EngineTarget:
    device: str = "cpu"
    max_sequences: int = 16
    max_length: int = 2048
    max_tokens: int = 3  # tokens per row of the longest call: 1 + the MTP draft length served


def step_args(step: str) -> list[str]:
    """The tensor arguments of STEPS[step] after `steps` (the object holding the model and the state)."""
    return list(inspect.signature(STEPS[step]).parameters)[1:]


def pool_fields(state: InferenceState) -> list[tuple[str, object, str]]:
    """(name, layer entry, attribute) of every state pool, in the order engines take them as inputs."""
    return [(f"{key}.{attr}", entry, attr) for key, entry in state.layers.items()
            for attr, tensor in vars(entry).items() if isinstance(tensor, torch.Tensor)]


def pool_tensors(state: InferenceState) -> list[torch.Tensor]:
    return [getattr(entry, attr) for _, entry, attr in pool_fields(state)]


class StepGraph(nn.Module):
    """`step(self, *args)` of compiled_step.STEPS over state pools passed as inputs: forward(*args, *pools) ->
    (out, then for a recording step each Mamba layer's conv and SSM states after every token)."""

    def __init__(self, model, state: InferenceState, step: str, record: bool):
        super().__init__()
        self.model, self.state, self.step, self.record = model, state, STEPS[step], record
        self.n_args, self.fields = len(step_args(step)), pool_fields(state)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for (_, entry, attr), tensor in zip(self.fields, inputs[self.n_args:]):
            setattr(entry, attr, tensor)
        with self.state.recording_steps(self.record):
            out = self.step(self, *inputs[:self.n_args])
            recorded = [t for entry in self.state.mamba_layers() if entry.steps for t in entry.steps[-1][1:]]
        return (out, *recorded)


def example_args(model, step: str, rows: int, T: int) -> list[torch.Tensor]:
    """Inputs of STEPS[step] for `rows` rows of T tokens (continuing sequences in slots 0..rows-1); a step function
    with an argument of another name needs its example here."""
    dev = model.device
    values = {"ids": torch.zeros(rows, T, dtype=torch.long, device=dev),
              "hidden": torch.zeros(rows, T, model.spec.hidden_size, dtype=model.dtype, device=dev),
              "slots": torch.arange(rows, device=dev), "past": torch.ones(rows, dtype=torch.long, device=dev)}
    return [values[name] for name in step_args(step)]


def build_engines(source: Path, out: Path, target: EngineTarget, tp: int = 1, skipped: str | None = None,
                  log=print) -> dict:
    """Compile the engines of the checkpoint `source` (what serving loads: a build's checkpoint/) into `out`, with
    manifest.json; returns the stage's summary. A model that cannot be exported, or a build that `skipped` them (the
    reason), gets a manifest saying why."""
    from ...export.checkpoint import open_checkpoint
    from ..network.loading import load

    why = skipped or not_built_yet(target.device, tp)
    model = None if why else load(source, device=target.device)  # (a model without engines is not loaded)
    dtype = None if model is None else str(model.dtype).removeprefix("torch.")
    manifest = Manifest(device=torch.device(target.device).type, arch=host_arch(target.device),
                        torch=torch.__version__, dtype=dtype, max_sequences=target.max_sequences,
                        max_length=target.max_length,
                        fingerprint=open_checkpoint(source).fingerprint(), unsupported=why or unsupported(model))
    if manifest.unsupported is None:
        manifest.engines = [_compile(model, step, T, record, out, target, log)
                            for step, T, record in step_shapes(target.max_tokens, model.mtp is not None)]
    manifest.write(out)
    return {"engines": len(manifest.engines), "arch": manifest.arch, "unsupported": manifest.unsupported}


def not_built_yet(device: str, tp: int) -> str | None:
    """Why engines for `device` and `tp` ranks are not built, whatever the model, or None."""
    if tp > 1:
        return (f"--tp {tp}: per-rank engines are not built yet (a rank's in-place torch.distributed all-reduce "
                "would have to be a functional collective in the graph)")
    if torch.device(device).type == "cuda":  # (no GPU was available to this work)
        return ("--engine-device cuda: not built yet (the Triton kernels must become torch.library.triton_op to be "
                "compiled into a package; as custom ops they stay Python callbacks, and their inf dt limit breaks "
                "loading); serving compiles CUDA graphs at load")
    return None


@torch.no_grad()
def _compile(model, step: str, T: int, record: bool, out: Path, target: EngineTarget, log) -> EngineEntry:
    state = model.new_state(target.max_sequences, target.max_length, mtp=model.mtp is not None)
    graph = StepGraph(model, state, step, record)
    exported = torch.export.export(graph, (*example_args(model, step, target.max_sequences, T),
                                           *pool_tensors(state)), strict=False)
    file = f"rank0/{step}_t{T}{'_record' if record else ''}.pt2"
    (out / file).parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(exported, package_path=str(out / file), inductor_configs=INDUCTOR_CONFIGS)
    log(f"[engines] {file}")
    recorded = [f"{key}.{kind}_steps" for key, entry in state.layers.items() if isinstance(entry, MambaState)
                for kind in ("conv", "ssm")] if record else []
    return EngineEntry(file=file, step=step, tokens=T, record=record,
                       inputs=[*step_args(step), *(name for name, _, _ in pool_fields(state))],
                       outputs=["out", *recorded])
