"""The one place a serving stack is assembled from a build folder or a checkpoint.

`nemo3 generate`, `nemo3 bench`, the Python API and Triton's model (`load_server`, the default
`server_factory`) all come here, so the defaults (MTP draft length; a build's ahead-of-time engines, else
compiled or eager decode steps) are decided once:

    scheduler = open_scheduler("deploy", StackOptions(max_sequences=8))   # a Scheduler, driven by its caller
    server = load_server(Path("deploy"), device="cuda", tp=1)             # the same on a background thread
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...export.build_folder import BuildFolder, model_folder
from ..executors.aot_executor import AOTExecutor
from ..executors.aot_manifest import MANIFEST, Manifest
from ..executors.torch_executor import TorchExecutor
from ..network.loading import load
from .scheduler import Scheduler
from .serving import ThreadedServer
from .text import TextCodec

DEFAULT_MTP_DRAFT_TOKENS = 2  # draft length when the model has an MTP head and the caller does not say


@dataclass(frozen=True)
class StackOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = None
    max_sequences: int = 8
    max_length: int = 1024
    max_num_tokens: int = 256  # token budget per step
    num_speculative_tokens: int | None = 0  # None: DEFAULT_MTP_DRAFT_TOKENS when the model has an MTP head, else 0
    # True: decode steps compiled where the model allows it (executors/compiled_step.unsupported says why not),
    # False: eager; None: compiled on CUDA (CUDA graphs), eager on CPU (compiling costs tens of seconds per shape)
    compile: bool | None = None
    # a build's ahead-of-time engines (OUT/engines/): None: used when the build has them (their max_sequences and
    # max_length replace the ones above), True: required, False: not used
    engines: bool | None = None


def open_scheduler(path: str | Path | None = None, options: StackOptions = StackOptions()) -> Scheduler:
    """A scheduler serving `path` (a build folder's checkpoint, a checkpoint, or None: the built-in model)."""
    folder = model_folder(path)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={options.device!r}, but torch {torch.__version__} sees no CUDA device here: serve on "
                         "a GPU machine or set the model's config.pbtxt parameter device to \"cpu\"")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (is {path} a nemo3 build or checkpoint folder?)")
    model = load(folder, device=options.device, dtype=options.dtype)
    k = options.num_speculative_tokens
    if k is None:
        k = DEFAULT_MTP_DRAFT_TOKENS if model.mtp is not None else 0
    engines = _engines(path, folder, options.engines)
    if engines is not None:
        executor = AOTExecutor(model, engines)
    else:
        compile = options.compile if options.compile is not None else options.device.startswith("cuda")
        executor = TorchExecutor(model, options.max_sequences, options.max_length, compile=None if compile else False)
    return Scheduler(executor, TextCodec.from_checkpoint(folder, model.spec), max_num_tokens=options.max_num_tokens,
                     num_speculative_tokens=k)


def _engines(path, checkpoint: Path, wanted: bool | None) -> Path | None:
    """The engines folder to serve `path` (whose `checkpoint` is loaded) with, or None; `wanted` True and none
    there, or engines built from another checkpoint: a one-line error."""
    from ...export.checkpoint import open_checkpoint

    build = BuildFolder.of(path)
    folder = build.engines if build is not None else None
    if wanted is False:
        return None
    if folder is None or not (folder / MANIFEST).is_file():
        if wanted:
            raise FileNotFoundError(f"{path}: no {MANIFEST} under engines/ (build it with nemo3-build)")
        return None
    manifest = Manifest.read(folder)
    if manifest.unsupported and not wanted:
        return None  # a build whose model cannot be exported yet (its manifest says why): compiled or eager steps
    if manifest.fingerprint != open_checkpoint(checkpoint).fingerprint():
        raise ValueError(f"{folder / MANIFEST}: engines built from another checkpoint than {checkpoint}: rebuild them "
                         f"(nemo3-build --output {build.root})")
    return folder


def load_server(build_dir: str | Path, device: str = "cpu", tp: int = 1, **options) -> ThreadedServer:
    """The server factory Triton's model.py calls (triton_repo/serving_api.py): serve a build folder or a checkpoint.

    `options` are StackOptions fields; serving defaults to 16 sequences of up to 2048 tokens and the model's MTP."""
    if tp != 1:
        raise ValueError(f"tensor_parallel_size={tp}: the torch executor serves one rank per instance; "
                         "multi-rank serving goes through the trtllm target (--target trtllm)")
    stack = replace(StackOptions(max_sequences=16, max_length=2048, num_speculative_tokens=None), device=device,
                    **options)
    return ThreadedServer(open_scheduler(build_dir, stack))
