"""Write a safetensors file one tensor at a time, so memory does not grow with the file.

The format: an 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (padded with
spaces so the data starts 8-byte aligned), then the tensors' raw little-endian bytes back to back,
offsets relative to the end of the header. Since every tensor's size follows from its dtype and
shape, the header is written first and each tensor's bytes are streamed after it, in header order.

    with SafetensorsWriter(path, [(name, dtype, shape), ...]) as out:
        for name, dtype, shape in entries:
            out.write(name, tensor)

The file is written as `<path>.tmp` and renamed to `path` only when every tensor has been written;
an error (or a missing tensor) removes the temporary file instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import DTYPES

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors by nemo3") from None


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


class SafetensorsWriter:
    """Streams tensors into a safetensors file whose header is fixed up front (see the module docstring)."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._order = [name for name, _, _ in entries]
        if len(set(self._order)) != len(self._order):
            raise ValueError(f"{self.path}: duplicate tensor names")
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in entries:
            size = tensor_bytes(dtype, tuple(shape))
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected[name] = (dtype, tuple(shape))
            offset += size
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self._next = 0
        self._file = open(self.tmp, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor`, which must be the next entry, with the dtype and shape the header gives it."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise ValueError(f"{self.path}: got tensor {name}, expected {expected}")
        dtype, shape = self._expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                             f"the header says {dtype} {list(shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        """Finish the file: rename it into place if complete, else remove it and raise."""
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self._order):
            self.tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written "
                             f"(next: {self._order[self._next]})")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and remove the temporary file."""
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
