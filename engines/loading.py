"""Build a `Model` from a checkpoint folder: every tensor of the checkpoint goes into the module tree."""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.names import fp32_tensors
from .model import Model


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Model:
    """Load a Nemotron 3 checkpoint (default: the built-in model) as a `Model` in eval mode.

    dtype None: float32 on CPU, bfloat16 elsewhere. Router correction biases stay float32.
    The module tree is built on the meta device and takes the checkpoint's tensors as they are
    read, so no memory is spent on a random initialization.
    """
    from ..export.builtin import resolve_checkpoint
    from ..export.checkpoint import open_checkpoint

    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    source = resolve_checkpoint(path)
    ckpt = open_checkpoint(source)
    ckpt.validate()
    with torch.device("meta"):
        model = Model(ckpt.spec)
    wanted, present = set(model.state_dict()), set(ckpt.names())
    if wanted != present:
        missing, extra = sorted(wanted - present), sorted(present - wanted)
        raise ValueError(f"{source}: the network cannot take this checkpoint's tensors: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} ({len(missing)} and {len(extra)} in all)")
    tensors = {name: ckpt.get(name, dtype=torch.float32 if fp32_tensors(name) else dtype).to(device)
               for name in wanted}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
