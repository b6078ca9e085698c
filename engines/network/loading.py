"""Build a `Model` from a checkpoint folder: every tensor of the checkpoint goes into the module tree.

A tensor-parallel rank (a sharded `Parallel`, engines/parallel.py) takes its part of each tensor:
cut from the full checkpoint as it is read (`load`, export/sharding.py), or read from the per-rank
checkpoint export/rank_writer.py wrote (`load_rank`, `OUT/ranks/rank{r}/`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ...export.checkpoint import Checkpoint
from ...export.names import fp32_tensors
from ...export.spec import ModelSpec
from .model import Model
from .moe import MoE
from .quant_linear import install_quant_linears, prepare_quant_linears
from .parallel import SINGLE, Parallel


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         parallel: Parallel = SINGLE) -> Model:
    """Load a Nemotron 3 checkpoint (default: the built-in model) as a `Model` in eval mode.

    dtype None: float32 on CPU, bfloat16 elsewhere. Router correction biases stay float32.
    The module tree is built on the meta device and takes the checkpoint's tensors as they are
    read, so no memory is spent on a random initialization. A sharded `parallel` keeps only the
    rank's part of each tensor (tensors it holds none of, such as other ranks' experts, are not read).
    """
    from ...export.builtin import resolve_checkpoint
    from ...export.checkpoint import open_checkpoint
    from ...export.sharding import shard_of

    source = resolve_checkpoint(path)
    ckpt = open_checkpoint(source)
    ckpt.validate()
    if ckpt.quantized and parallel.sharded:
        raise ValueError(f"{source}: a quantized checkpoint loads unsharded only (tp 1); a build's per-rank "
                         "weights (load_rank) load on tensor-parallel ranks")
    spec, world, rank = ckpt.spec, parallel.world_size, parallel.rank
    shards = {name: shard_of(name, ckpt.shape(name), ckpt.dtype(name), spec, world, rank, parallel.moe)
              for name in ckpt.names()}
    held = [name for name, shard in shards.items() if shard is not None]
    # a part of a tensor is copied out of it, so the whole tensor is freed once read
    return _assemble(spec, parallel, held, lambda name: shards[name].apply(ckpt.get(name)), str(source),
                     device, dtype, copy=parallel.sharded, quantized=ckpt if ckpt.quantized else None)


def load_rank(folder: str | Path, parallel: Parallel, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> Model:
    """Rank `parallel.rank`'s `Model` from per-rank checkpoints (`folder/rank{r}/`, export/rank_writer.py):
    `folder` is a build's `OUT/ranks` or a build folder holding one. Quantized rank weights (a rank folder with
    hf_quant_config.json) load as QuantLinears of the rank's shapes: NVFP4 codes and block scales cut along
    the same rows or whole 16-value blocks, per-tensor scales whole."""
    from ...export.checkpoint import read_header
    from ...export.rank_writer import RANK_FILE

    where, config = read_rank_config(folder, parallel.rank)
    if (config["world_size"], config["moe_parallel"]) != (parallel.world_size, parallel.moe):
        raise ValueError(f"{where}: written for --tp {config['world_size']} --moe-parallel {config['moe_parallel']}, "
                         f"not --tp {parallel.world_size} --moe-parallel {parallel.moe}")
    spec = ModelSpec.from_config(config["model"], source=str(where / "config.json"))
    ckpt = Checkpoint(where, spec, list(read_header(where / RANK_FILE).values()))
    if bool(config.get("quantization")) != ckpt.quantized:
        raise ValueError(f"{where}: config.json and hf_quant_config.json disagree on whether the weights are "
                         "quantized")
    with ckpt:
        return _assemble(spec, parallel, ckpt.names(), ckpt.get, str(where / RANK_FILE), device, dtype,
                         quantized=ckpt if ckpt.quantized else None)


def read_rank_config(folder: str | Path, rank: int = 0) -> tuple[Path, dict]:
    """(folder of rank `rank`, its config.json) under `folder`: a build's `OUT/ranks`, or the build folder."""
    from ...export.rank_writer import RANK_FORMAT, rank_dir

    folder = Path(folder)
    if (folder / "ranks").is_dir():
        folder = folder / "ranks"
    where = rank_dir(folder, rank)
    if not (where / "config.json").is_file():
        raise FileNotFoundError(f"{where / 'config.json'}: no such file (is {folder} a build's ranks folder?)")
    config = json.loads((where / "config.json").read_text())
    if config.get("format") != RANK_FORMAT:
        raise ValueError(f"{where / 'config.json'}: format {config.get('format')!r}, expected {RANK_FORMAT!r}")
    return where, config


def _assemble(spec: ModelSpec, parallel: Parallel, names: list[str], read: Callable[[str], torch.Tensor],
              source: str, device: str | torch.device, dtype: torch.dtype | None, copy: bool = False,
              quantized: Checkpoint | None = None) -> Model:
    """The model of `spec` on `parallel`'s rank, holding read(name) for each of `names` (all it needs).

    With a `quantized` checkpoint (ModelOpt unified export), each layer it stores quantized becomes a
    QuantLinear (engines/quant_linear.py): packed weights and scales kept as stored, the weight
    dequantized once into `dtype`, activations and K/V fake-quantized with their scales."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device("meta"):
        model = Model(spec, parallel)
    stored_as_is = set()
    if quantized is not None:  # a rank's checkpoint holds its parts: its layers are checked against the rank's shapes
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()} if parallel.sharded else None
        stored_as_is = install_quant_linears(model, quantized, expected)
    wanted, present = set(model.state_dict()), set(names)
    if wanted != present:
        missing, extra = sorted(wanted - present), sorted(present - wanted)
        raise ValueError(f"{source}: the network cannot take this checkpoint's tensors: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} ({len(missing)} and {len(extra)} in all)")
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    tensors = {name: read(name).reshape(shapes[name]).to(device=device, copy=copy) if name in stored_as_is
               else read(name).to(device=device, dtype=torch.float32 if fp32_tensors(name) else dtype, copy=copy)
               for name in wanted}  # (the reshape turns 1-element scales into the 0-dim ones ModelOpt writes)
    model.load_state_dict(tensors, strict=True, assign=True)
    prepare_quant_linears(model, dtype)
    for module in model.modules():
        if isinstance(module, MoE):
            module.stack_experts()
    return model.eval()
