"""Per-rank checkpoints: `<folder>/rank{r}/model.safetensors` + `config.json` for every rank of `--tp N`.

    write_ranks("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "deploy/ranks", tp=4, moe_parallel="ep")

Each rank file holds the rank's part of every tensor (export/sharding.py) under its canonical name,
in the input's dtype (packed NVFP4 and FP8 weights and their scales included). The input is read
one tensor at a time from its memory-mapped files and every rank's part is streamed straight into
the rank's file (export/safetensors_writer.py), so peak memory is bounded by the largest tensor
plus RELEASE_BYTES, not by the model: the reader's mappings are dropped whenever RELEASE_BYTES of
input have been touched. Each rank's file is written as `model.safetensors.tmp` and renamed when
complete.

A rank's config.json:

    format            "nemo3-rank/1"
    world_size, tp    N (tensor parallelism is the only parallelism: world size = tp)
    rank              r
    moe_parallel      "ep" or "tp"
    expert_numbering  "global": expert tensors keep their global index (sharding.py's docstring)
    layout            the [start, stop) heads, groups, experts, channels, vocab rows the rank holds
    quantization      the input's hf_quant_config.json, or null
    source            the input folder and its fingerprint
    model             the full model's config (ModelSpec.to_config(), hub keys)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import QUANT_CONFIG_FILE, Checkpoint, open_checkpoint
from .safetensors_writer import SafetensorsWriter, tensor_bytes
from .sharding import check_tp, rank_layout, shard_of

RANK_FORMAT = "nemo3-rank/1"
RANK_FILE = "model.safetensors"
RELEASE_BYTES = 256 * 2**20  # drop the input's memory maps after touching this much of it


def rank_dir(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}"


def write_ranks(source: str | Path | Checkpoint, folder: str | Path, tp: int, moe_parallel: str = "ep") -> dict:
    """Write `folder/rank{r}/` for r < tp from the checkpoint `source`; returns a summary for build.json.

    Raises ShardError (naming the tensor and dimension, listing valid --tp values) before writing
    anything when the model does not split over `tp` ranks."""
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    ckpt.validate()
    spec, names = ckpt.spec, ckpt.names()
    stored = {name: (ckpt.shape(name), ckpt.dtype(name)) for name in names}
    check_tp(spec, tp, moe_parallel, stored)

    # what each rank holds, in input order: the headers are fixed before any data is read
    shards = {r: {} for r in range(tp)}
    for name, (shape, dtype) in stored.items():
        for r in range(tp):
            shard = shard_of(name, shape, dtype, spec, tp, r, moe_parallel)
            if shard is not None:
                shards[r][name] = shard

    folder = Path(folder)
    writers = []
    try:
        for r in range(tp):
            rank_dir(folder, r).mkdir(parents=True, exist_ok=True)
            entries = [(name, stored[name][1], shard.shape(stored[name][0])) for name, shard in shards[r].items()]
            writers.append(SafetensorsWriter(rank_dir(folder, r) / RANK_FILE, entries,
                                             metadata={"format": "pt", "rank": str(r), "tp": str(tp)}))
        _stream(ckpt, names, shards, writers)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        ckpt.close()

    quant_config = ckpt.path / QUANT_CONFIG_FILE
    quantization = json.loads(quant_config.read_text()) if quant_config.is_file() else None
    source_record = {"checkpoint": str(ckpt.path.resolve()), "fingerprint": ckpt.fingerprint()}
    for r in range(tp):
        config = {
            "format": RANK_FORMAT, "world_size": tp, "tp": tp, "rank": r, "moe_parallel": moe_parallel,
            "expert_numbering": "global", "layout": rank_layout(spec, tp, r, moe_parallel),
            "quantization": quantization,
            "source": source_record,
            "model": spec.to_config(),
        }
        (rank_dir(folder, r) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if quantization is not None:
            shutil.copyfile(quant_config, rank_dir(folder, r) / QUANT_CONFIG_FILE)
    return {"tp": tp, "moe_parallel": moe_parallel, "source": str(ckpt.path.resolve()),
            "ranks": [{"rank": r, "tensors": len(shards[r]), "bytes": writers[r].data_bytes} for r in range(tp)]}


def _stream(ckpt: Checkpoint, names: list[str], shards: dict, writers: list[SafetensorsWriter]) -> None:
    """Read each tensor once per rank that holds part of it and append that part to the rank's file."""
    touched = 0  # bytes of the input mapped into memory since the last release
    for name in names:
        whole_read = False  # all of this tensor's pages are mapped (until the next release)
        for r, writer in enumerate(writers):
            shard = shards[r].get(name)
            if shard is None:
                continue
            tensor = ckpt.get(name)  # memory-mapped: only the pages the rank's part needs are read
            part = shard.apply(tensor)
            writer.write(name, part)
            if shard.axis == 0:  # a split along rows reads only its rows
                touched += tensor_bytes(part.dtype, tuple(part.shape))
            elif not whole_read:  # a whole tensor or a split along columns reads every row
                touched += tensor_bytes(tensor.dtype, tuple(tensor.shape))
                whole_read = True
            del tensor, part
            if touched >= RELEASE_BYTES:
                ckpt.close()  # unmaps the files: the pages read so far leave this process's memory
                touched, whole_read = 0, False
