"""The executor of a build's ahead-of-time engines (`OUT/engines/`, aot_build.py): nothing is compiled at load.

`AOTExecutor` is the torch executor whose decode, prefill-chunk and speculative calls (padded to the engines'
max_sequences rows) run the AOTInductor packages instead of torch.compile'd steps; the MTP pass over a prompt stays
eager, as in the torch executor. The engines update the executor's own state pools and read the served model's
weights (user-managed constants: nothing is copied); each call passes the block table sliced to the pages it reads
(`CompiledSteps.read_pages`: a dynamic dimension of every package). A call no package covers (a draft length the
build did not export, a min_tokens ban, a sampled speculative step of a build without it) runs the step eagerly.
A tensor-parallel rank (a --tp N > 1 build, under the DistributedExecutor) runs its own rank's packages, whose
collectives meet the other ranks' in the process group the manifest names.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .aot_manifest import EngineEntry, Manifest, check_ranks, check_runs_here
from . import compiled_step
from .compiled_step import CompiledSteps
from .step_export import constant_tensors, pool_tensors
from .torch_executor import TorchExecutor


class EngineSteps(CompiledSteps):
    """CompiledSteps whose call of a step function runs the package of the call's tensor arguments."""

    def __init__(self, model, state, folder: Path, manifest: Manifest):
        super().__init__(model, state, tuple(manifest.prefill_tokens))
        self.runners = {_key(entry): _load(folder / entry.file, model) for entry in manifest.engines
                        if entry.rank == model.parallel.rank}
        # every package's inputs after the step's and the block table's
        self.extra = [*pool_tensors(state)[1:], *constant_tensors(model)]

    def _call(self, fn, *args) -> torch.Tensor:
        runner = self.runners.get((fn.__name__, args[0].shape[1], tuple(a is not None for a in args)))
        if runner is None:
            return fn(self, *args)
        table = self.state.pages.table[:, :self.state.pages.bound].contiguous()
        self.model.parallel.settle()
        return runner.boxed_run([*(a for a in args if a is not None), table, *self.extra])[0]

    def warm_up(self, max_tokens: int) -> None:
        """Nothing to compile."""


def _key(entry: EngineEntry) -> tuple:
    names = list(inspect.signature(getattr(compiled_step, entry.step)).parameters)[1:]
    return entry.step, entry.tokens, tuple(name in entry.inputs for name in names)


def _load(path: Path, model):
    """The package's runner, its parameters and buffers pointed at the model's (user-managed: not copied).
    (torch._inductor.aoti_load_package would first compile a test program per CPU vector ISA to warn about a
    mismatch, tens of seconds on a busy machine: the manifest's check has refused packages of another arch.)"""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)
    tensors = dict(model.named_parameters(prefix="model")) | dict(model.named_buffers(prefix="model"))
    loader.load_constants({name: tensors[name].detach() for name in loader.get_constant_fqns()}, False, True, True,
                          False)
    return loader


class AOTExecutor(TorchExecutor):
    kind = "aot"

    def __init__(self, model, folder: str | Path):
        folder = Path(folder)
        manifest = Manifest.read(folder)
        check_runs_here(manifest, folder, model.device)
        check_ranks(manifest, folder, model.parallel)
        if manifest.unsupported or not manifest.engines:
            raise ValueError(f"{folder}: no engines ({manifest.unsupported})")
        if str(model.dtype).removeprefix("torch.") != manifest.dtype:
            raise ValueError(f"{folder}: engines built for {manifest.dtype} activations, the model runs {model.dtype}")
        super().__init__(model, manifest.max_sequences, manifest.max_length, compile=False,
                         page_size=manifest.page_size)
        self.compiled = EngineSteps(model, self.state, folder, manifest)
