"""`OUT/engines/manifest.json`: what a build's AOTInductor packages were compiled for, and the check that they
can run here.

    {"format": 4, "device": "cpu", "arch": "x86_64-AVX512", "torch": "2.13.0", "dtype": "float32",
     "max_sequences": 16, "max_length": 2048, "page_size": 64, "prefill_tokens": [16, 64, 256], "fingerprint": "<the served checkpoint's fingerprint>",
     "tp": 1, "group": null,
     "engines": [{"file": "rank0/speculative_step_t3.pt2", "step": "speculative_step", "tokens": 3,
                  "sampling": false, "max_pages": 32, "inputs": [...], "outputs": ["out"], "rank": 0}, ...],
     "unsupported": null}

Each package holds no weights: its inputs are named in `inputs` (step_export.py: the step's tensors, the block table
sliced to the pages read, the state pools, the model's plain-attribute tensors), its parameters and buffers are
loaded from the served model by their module paths (AOTInductor's user-managed constants), so the weights are in
memory once.

A --tp N > 1 build has one package per rank and step (`rank{r}/`, `rank`: the rank that runs it; a rank's graph
differs from the others' in its vocabulary range and in which rank adds the row-parallel biases), whose collectives
run in the process group named `group` of `tp` ranks (engines/network/parallel.py): `check_ranks` refuses them to
a rank of another tp or group in one line.

A package runs only on the device kind, architecture (CPU packages are built with -march=native; CUDA ones hold
cubins for one sm_XX) and torch version it was built with: `check_runs_here` refuses any other in one line that
says what to rebuild. `unsupported` says why a build has no engines (the model cannot be exported yet).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT = 4
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EngineEntry:
    file: str  # relative to the engines folder
    step: str  # a step function of compiled_step.STEPS (compiled_step.StepShape)
    tokens: int  # T: tokens per row
    sampling: bool  # a speculative step with uniforms and draft_probs
    # the pages per row the attention reads, any bound (compiled_step.CompiledSteps.read_pages) from 1 to this: the
    # columns of the block table input, a dynamic dimension (step_export.PAGES)
    max_pages: int
    inputs: list[str]
    outputs: list[str]
    rank: int = 0  # the tensor-parallel rank that runs it


@dataclass
class Manifest:
    device: str  # "cpu" or "cuda"
    arch: str  # host_arch(device) where it was built
    torch: str
    dtype: str | None  # activation dtype, e.g. "float32" (None: no engines)
    max_sequences: int  # every engine runs batches of this many rows (the runtime pads to it)
    max_length: int  # tokens per state slot
    page_size: int  # tokens per KV page
    fingerprint: str  # of the checkpoint the engines were built from (the one serving loads)
    prefill_tokens: list[int] = field(default_factory=list)  # the prefill chunk lengths with packages
    engines: list[EngineEntry] = field(default_factory=list)
    unsupported: str | None = None  # why there are no engines
    tp: int = 1  # tensor-parallel ranks
    group: str | None = None  # with tp > 1: the process group's name the packages' collectives run in
    format: int = FORMAT

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT}: rebuild the engines "
                             f"(nemo3-build --force)")
        data["engines"] = [EngineEntry(**entry) for entry in data.get("engines", [])]
        return cls(**data)


def host_arch(device: str | torch.device) -> str:
    """The architecture an engine built here is tied to: the CPU's machine and vector ISA, or the GPU's sm_XX."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def check_runs_here(manifest: Manifest, folder: Path, device: str | torch.device) -> None:
    """Raise a one-line ValueError when `manifest`'s engines were built for another device, arch or torch."""
    device = torch.device(device)
    here = (device.type, host_arch(device), torch.__version__)
    built = (manifest.device, manifest.arch, manifest.torch)
    if built != here:
        raise ValueError(f"{Path(folder) / MANIFEST}: engines built for {built[0]} {built[1]} with torch {built[2]}, "
                         f"this is {here[0]} {here[1]} with torch {here[2]}: rebuild them here with "
                         f"`nemo3-build --output {Path(folder).parent} --engine-device {device.type}`")


def check_ranks(manifest: Manifest, folder: Path, parallel) -> None:
    """Raise a one-line ValueError when `manifest`'s engines were built for another tp or process group than the
    rank `parallel` (engines/network/parallel.py's Parallel)."""
    built = (manifest.tp, manifest.group if manifest.tp > 1 else None)
    here = (parallel.world_size, parallel.group_name if parallel.sharded else None)
    if built != here:
        raise ValueError(f"{Path(folder) / MANIFEST}: engines built for --tp {built[0]}"
                         f"{f' (process group {built[1]!r})' if built[1] else ''}, this rank runs --tp {here[0]}"
                         f"{f' (process group {here[1]!r})' if here[1] else ''}: rebuild them with "
                         f"`nemo3-build --output {Path(folder).parent} --tp {here[0]} --engines`")
