"""The one place a serving stack is assembled from a build folder or a checkpoint.

`nemo3 generate`, `nemo3 bench`, the Python API and Triton's model (`load_server`, the default
`server_factory`) all come here, so the defaults (MTP draft length; a build's ahead-of-time or TensorRT engines, else
compiled or eager decode steps) are decided once:

    scheduler = open_scheduler("deploy", StackOptions(max_sequences=8))   # a Scheduler, driven by its caller
    server = load_server(Path("deploy"), device="cuda", tp=1)             # the same on a background thread

A build made with `--tp N` (N > 1) is served by N ranks: this process is rank 0, runs the Scheduler over a
`DistributedExecutor` and starts the N - 1 worker ranks itself (runtime/launcher.py's start_workers; gloo on
CPU, NCCL on GPU, one GPU per rank). `scheduler.executor.close()` (or the server's close()) stops them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch

from ...export.build_folder import BuildFolder, model_folder
from ..executors.aot_executor import AOTExecutor
from ..executors.aot_manifest import MANIFEST, Manifest
from ..executors.base import Executor
from ..executors.distributed import DistributedExecutor, rank_executor, serve_rank
from ..executors.sequence_budget import sequence_budget
from ..executors.tensorrt_executor import TensorRTExecutor, plan_path
from ..executors.tensorrt_folder import MANIFEST as TENSORRT_MANIFEST
from ..executors.tensorrt_folder import read_manifest
from ..executors.torch_executor import TorchExecutor
from ..network.loading import load, load_rank, read_rank_config
from ..network.parallel import Parallel
from .launcher import READY, default_backend, start_workers
from .scheduler import Scheduler
from .serving import ThreadedServer
from .text import TextCodec

DEFAULT_MTP_DRAFT_TOKENS = 2  # draft length when the model has an MTP head and the caller does not say
RANK_TIMEOUT_S = 60.0  # tensor-parallel builds: how long a rank waits for the others at one collective


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
    # a build's engines, ahead-of-time (OUT/engines/) or TensorRT (OUT/engines/tensorrt/, --target tensorrt): None:
    # used when the build has them (their max_sequences, max_length and page size replace the ones here), True:
    # required, False: not used
    engines: bool | None = None
    # tensor-parallel builds: how long a rank waits for the others at one collective before the stack fails
    # (a rank that hangs)
    rank_timeout_s: float = RANK_TIMEOUT_S
    # bytes for sequence state (SSM state, conv windows, KV pages) on each rank: when given, max_sequences and the
    # KV pages are what fits of sequences of max_length tokens, by the planner's accounting (`nemo3 plan`'s "free
    # for sequences" gives the runtime its "max concurrent sequences"); None: max_sequences slots of max_length tokens
    state_memory: int | None = None


def open_scheduler(path: str | Path | None = None, options: StackOptions = StackOptions()) -> Scheduler:
    """A scheduler serving `path` (a build folder, a checkpoint, or None: the built-in model); a build made with
    --tp N > 1 runs on N ranks (module docstring)."""
    folder = model_folder(path)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={options.device!r}, but torch {torch.__version__} sees no CUDA device here: serve on "
                         "a GPU machine or set the model's config.pbtxt parameter device to \"cpu\"")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (is {path} a nemo3 build or checkpoint folder?)")
    executor = open_executor(path, options)
    try:
        k = options.num_speculative_tokens
        if k is None:
            k = DEFAULT_MTP_DRAFT_TOKENS if executor.has_mtp else 0
        return Scheduler(executor, TextCodec.from_checkpoint(folder, executor.spec),
                         max_num_tokens=options.max_num_tokens, num_speculative_tokens=k)
    except BaseException:
        executor.close()
        raise


def build_ranks(path: str | Path | None) -> tuple[int, str]:
    """(tp, moe_parallel) a build folder's per-rank weights were written for; (1, "ep") for anything else."""
    build = BuildFolder.of(path)
    if build is None or not build.ranks.is_dir():
        return 1, "ep"
    _, config = read_rank_config(build.ranks)
    return config["world_size"], config["moe_parallel"]


def open_executor(path: str | Path | None, options: StackOptions) -> Executor:
    """The executor of `path`: the torch executor over the whole model, or over rank 0 driving the others."""
    tp, moe = build_ranks(path)
    compile = options.compile if options.compile is not None else options.device.startswith("cuda")
    if tp == 1:
        folder = model_folder(path)
        model = load(folder, device=options.device, dtype=options.dtype)
        tensorrt = _tensorrt_engines(path, options)
        if tensorrt is not None:
            return TensorRTExecutor(model, tensorrt)
        engines = _engines(path, folder, options)
        if engines is not None:
            return AOTExecutor(model, engines)
        max_sequences, num_pages = sequence_budget(model, options.max_sequences, options.max_length,
                                                   options.state_memory)
        return TorchExecutor(model, max_sequences, options.max_length, compile=None if compile else False,
                             num_pages=num_pages)
    ranks = str(BuildFolder(Path(path)).ranks)
    engines = _engines(path, model_folder(path), options)
    workers = start_workers(serve_rank, tp, default_backend(options.device),
                            args=(ranks, moe, options.device, options.dtype, options.max_sequences,
                                  options.max_length, options.state_memory, engines, READY),
                            timeout=timedelta(seconds=options.rank_timeout_s))
    try:
        local = rank_executor(load_rank(ranks, Parallel.from_process_group(moe), options.device, options.dtype),
                              options.max_sequences, options.max_length, options.state_memory, engines)
    except BaseException:
        workers.close()
        raise
    workers.wait_ready()
    return DistributedExecutor(local, workers)


def _may_use_engines(options: StackOptions) -> bool:
    """Whether a build's engines (ahead-of-time or TensorRT) may serve: not when they are refused, nor by default when
    state_memory is given (engines have the state shapes they were built for; state_memory sizes its own)."""
    return options.engines is True or (options.engines is None and options.state_memory is None)


def _engines(path, checkpoint: Path, options: StackOptions) -> Path | None:
    """The engines folder to serve `path` (whose `checkpoint` is loaded) with, or None; engines required and none
    there, or engines built from another checkpoint: a one-line error."""
    from ...export.checkpoint import open_checkpoint

    build = BuildFolder.of(path)
    folder = build.engines if build is not None else None
    if not _may_use_engines(options):
        return None
    manifest = Manifest.read(folder) if folder is not None and (folder / MANIFEST).is_file() else None
    if manifest is None or manifest.unsupported:
        if options.engines:
            why = manifest.unsupported if manifest else f"no {MANIFEST} under engines/"
            raise ValueError(f"{path}: no engines ({why}): build them with nemo3-build --engines")
        return None
    if manifest.fingerprint != open_checkpoint(checkpoint).fingerprint():
        raise ValueError(f"{folder / MANIFEST}: engines built from another checkpoint than {checkpoint}: rebuild them "
                         f"(nemo3-build --engines --output {build.root})")
    return folder


def _tensorrt_engines(path, options: StackOptions) -> Path | None:
    """The TensorRT engines folder of a --target tensorrt build whose engines (.plan) are built (engines required:
    also when they are not, and the executor names the command that builds them), or None."""
    build = BuildFolder.of(path)
    if build is None or not (build.tensorrt / TENSORRT_MANIFEST).is_file():
        return None
    if not _may_use_engines(options):
        return None
    graphs = read_manifest(build.tensorrt)["graphs"]
    return build.tensorrt if all(plan_path(build.tensorrt, g).is_file() for g in graphs) or options.engines else None


def load_server(build_dir: str | Path, device: str = "cpu", tp: int = 1, **options) -> ThreadedServer:
    """The server factory Triton's model.py calls (triton_repo/serving_api.py): serve a build folder or a checkpoint.

    `options` are StackOptions fields; serving defaults to 16 sequences of up to 2048 tokens and the model's MTP.
    `tp` must be the --tp the build was made with."""
    built = build_ranks(build_dir)[0]
    if tp != built:
        raise ValueError(f"tensor_parallel_size={tp}: {build_dir} was built for --tp {built}")
    stack = replace(StackOptions(max_sequences=16, max_length=2048, num_speculative_tokens=None), device=device,
                    **options)
    return ThreadedServer(open_scheduler(build_dir, stack))
