"""The one interface between nemo3's Triton model (`model.py`) and the nemo3 runtime.

`model.py` knows nothing of executors, schedulers or ranks. It loads an engine once per model
instance through a *server factory* named in `config.pbtxt` (parameter `server_factory`, an import
spec `"module:function"`, default `DEFAULT_SERVER_FACTORY`) and then only calls the methods
of `Server` (and asks `ready` whenever Triton checks the model's readiness):

    factory(build_dir: Path, device: str, tp: int) -> Server
        build_dir: the build output folder (build.json, ranks/, engines/, checkpoint/).
        device:    "cuda" or "cpu". With "cuda", model.py has already set CUDA_VISIBLE_DEVICES to
                   this instance's GPUs (parameter `gpu_device_ids`), so rank r uses cuda:r.
        tp:        tensor-parallel world size (parameter `tensor_parallel_size`); the factory
                   starts the tp - 1 other ranks itself and the returned engine drives them all.
        Raises ValueError / FileNotFoundError with a one-line message for a bad build.

    engine.stream(prompt: str, params: GenerationParams, request_id: str) -> Iterator[Delta]
        Called concurrently from many threads, one call per request (request_id unique).
        Yields this request's `Delta`s in order: `text` pieces that concatenate to the completion
        (prompt excluded), the `token_ids` they came from, and exactly one delta with
        `finished=True`, the last, carrying `finish_reason` and `stats` with at least
        "input_tokens" and "output_tokens", plus "acceptance_length" (tokens per verify step) when
        MTP speculation ran. A request the engine can never serve ends with
        `finish_reason=REFUSED` and `stats["error"]` (one line); one whose step raised ends with
        `finish_reason=ERROR` and `stats["error"]`, and the engine serves on. Invalid parameters
        raise ValueError (one line naming the field) before the first delta.

    engine.cancel(request_id: str) -> bool
        Thread-safe. The request's stream ends soon with a final delta whose finish_reason is
        CANCELLED and its state is freed. False if the id is unknown or already finished.

    engine.ready() -> bool
        Thread-safe and cheap. False once the engine cannot serve any request (its serving thread
        stopped, its device keeps failing, or a tensor-parallel rank exited or did not answer in time: every
        stream then fails with that one line); Triton then reports the model not ready.

    engine.close() -> None
        Stop the ranks (no worker process is left behind) and free the memory (Triton's `finalize`).

`GenerationParams`, `Delta` and `FinishReason` are the runtime's own request types
(`nemo3.engines.runtime.requests`), so the engine passes them through without translation.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..engines.runtime.requests import Delta, FinishReason, GenerationParams

__all__ = ["DEFAULT_SERVER_FACTORY", "Delta", "Server", "ServerFactory", "FinishReason", "GenerationParams",
           "resolve_factory"]

# The runtime's implementation of `ServerFactory` (engines/runtime/factory.py).
DEFAULT_SERVER_FACTORY = "nemo3.engines.runtime.factory:load_server"


@runtime_checkable
class Server(Protocol):
    def stream(self, prompt: str, params: GenerationParams, request_id: str) -> Iterator[Delta]: ...

    def cancel(self, request_id: str) -> bool: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class ServerFactory(Protocol):
    def __call__(self, build_dir: Path, device: str, tp: int) -> Server: ...


def check_factory_spec(spec: str) -> tuple[str, str]:
    """Split `"package.module:function"`; ValueError naming the spec if it is not of that form."""
    module, _, attr = spec.partition(":")
    if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise ValueError(f"server_factory {spec!r}: expected 'package.module:function'")
    return module, attr


def resolve_factory(spec: str) -> ServerFactory:
    """Import the engine factory named by `spec` ("module:function")."""
    module_name, attr = check_factory_spec(spec)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"server_factory {spec!r}: cannot import {module_name} ({e})") from e
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"server_factory {spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"server_factory {spec!r} is not callable")
    return obj
