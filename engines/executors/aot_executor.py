"""The executor of a build's ahead-of-time engines (`OUT/engines/`, aot_build.py): nothing is compiled at load.

`AOTExecutor` is the torch executor whose decode, verify and MTP calls (padded to the engines' max_sequences rows)
run the AOTInductor packages instead of torch.compile'd steps; prefill chunks, the embedding of a call's
tokens and the lm_head stay eager, as in the torch executor. The engines update the executor's own state pools.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .aot_build import pool_tensors
from .aot_manifest import Manifest, check_runs_here
from .torch_executor import TorchExecutor


class EngineSteps:
    """compiled_step.CompiledSteps' interface (covers, backbone, mtp, warm_up) over loaded packages."""

    def __init__(self, folder: Path, manifest: Manifest, state):
        self.state = state
        self.runners = {(e.step, e.tokens, e.record): load_package(folder / e.file) for e in manifest.engines}

    def covers(self, T: int, mtp: bool = False) -> bool:
        return (("mtp", T, False) if mtp else ("backbone", T, self._recording())) in self.runners

    def _recording(self) -> bool:
        """Within the state's recording_steps (a speculative verify, or a decode batched with one)."""
        mamba = self.state.mamba_layers()
        return bool(mamba) and mamba[0].steps is not None

    def backbone(self, ids: torch.Tensor, slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        runner = self.runners["backbone", ids.shape[1], self._recording()]
        out, *recorded = runner(ids, slots, past, *pool_tensors(self.state))
        for entry, conv, ssm in zip(self.state.mamba_layers(), recorded[0::2], recorded[1::2]):
            entry.steps.append((slots.to(torch.int32), conv, ssm))
        return out

    def mtp(self, ids: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.runners["mtp", ids.shape[1], False](ids, hidden, slots, past, *pool_tensors(self.state))[0]

    def warm_up(self, max_tokens: int) -> None:
        """Nothing to compile; calls the engines do not cover (a draft length they were not built for) run eagerly."""


def load_package(path: Path):
    """torch._inductor.aoti_load_package without its device probe, which compiles a test program per CPU vector ISA
    to warn about a mismatch (tens of seconds on a busy machine with an empty inductor cache): the manifest's
    check (check_runs_here) has refused packages of another arch already. One runner, used by one thread at a time
    (the scheduler's), without thread synchronization."""
    from torch._inductor.package.package import AOTICompiledModel

    return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1))


class AOTExecutor(TorchExecutor):
    kind = "aot"

    def __init__(self, model, folder: str | Path):
        folder = Path(folder)
        manifest = Manifest.read(folder)
        check_runs_here(manifest, folder, model.device)
        if manifest.unsupported or not manifest.engines:
            raise ValueError(f"{folder}: no engines ({manifest.unsupported})")
        if str(model.dtype).removeprefix("torch.") != manifest.dtype:
            raise ValueError(f"{folder}: engines built for {manifest.dtype} activations, the model runs {model.dtype}")
        super().__init__(model, manifest.max_sequences, manifest.max_length, compile=False)
        self.compiled = EngineSteps(folder, manifest, self.state)
