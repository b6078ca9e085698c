"""Choosing between a kernel's Triton implementation and its plain-torch reference.

`impl` (an op argument, else the environment variable NEMO3_KERNEL_IMPL, else "auto"):

* "auto": the Triton kernel for CUDA tensors when triton imports, the reference otherwise;
* "triton": always the Triton kernel; on CPU this needs Triton's interpreter (TRITON_INTERPRET=1,
  which tests set before the first kernel is compiled);
* "reference": always the plain-torch reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

IMPL_ENV = "NEMO3_KERNEL_IMPL"
IMPLS = ("auto", "triton", "reference")


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the triton package is installed (looked up once, without importing it)."""
    return TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(impl: str | None, device: torch.device, where: str) -> bool:
    """True when the Triton kernel should run for tensors on `device`; `where` names the op for errors."""
    impl = impl or os.environ.get(IMPL_ENV) or "auto"
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl={impl!r} must be one of {', '.join(IMPLS)} (or set {IMPL_ENV})")
    if impl == "reference":
        return False
    if impl == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(f"{where}: impl='triton' needs the triton package (pip install nemo3[kernels])")
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"{where}: impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1")
    return True


_FUNCTIONAL = [False]


@contextlib.contextmanager
def functional_ops():
    """While active, every op is called as a custom op (never inlined as its reference) and the ops that update
    state pools in place run as their functional variants (`<op>_functional`: the updated pools are outputs),
    whose results are copied back: what an ONNX export needs, where each op must stay one node and no op may
    mutate its inputs."""
    _FUNCTIONAL.append(True)
    try:
        yield
    finally:
        _FUNCTIONAL.pop()


def functional_mode() -> bool:
    return _FUNCTIONAL[-1]


def eager_reference(impl: str | None, device: torch.device, where: str) -> bool:
    """True when a call runs the plain-torch reference directly, skipping the custom-op machinery (whose
    per-call Python overhead dominates small CPU batches). The references have static shapes and no
    host syncs, so a compiled step traces them into its graph; the Triton kernels stay opaque custom ops.
    Never under `functional_ops`."""
    return not functional_mode() and not use_triton(impl, device, where)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
