"""Writing the rows of a state pool that real sequences own, with static shapes.

Padding rows (slot < 0) must not write the pool. Selecting the real rows with a boolean mask gives a
data-dependent shape (and a host sync), which breaks a compiled or CUDA-graph-captured step. Instead
every row writes: a padding row writes pool row 0 with the value row 0 must end with (the value of the
real entry that targets row 0, else row 0's current value), so writes to one row always agree and
their order does not matter.
"""

from __future__ import annotations

import torch

from .dispatch import functional_mode


def write_rows(pool: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """pool[index[i]] = values[i] for every i with index[i] >= 0, in place.

    pool [R, ...]; index [M] int (real entries distinct, < 0 for padding); values [M, ...] (cast to
    pool.dtype). Shapes are static and nothing is read back to the host.
    """
    values = values.to(pool.dtype)
    # inductor cannot select float8 values: move bytes (not in an ONNX export, which has no bitcast)
    if pool.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and not functional_mode():
        pool, values = pool.view(torch.uint8), values.view(torch.uint8)
    owner = index == 0
    row0 = torch.where(owner.any(), values.index_select(0, owner.int().argmax().view(1))[0], pool[0])
    real = (index >= 0).view(-1, *([1] * (values.dim() - 1)))
    pool[index.clamp(min=0).long()] = torch.where(real, values, row0)
