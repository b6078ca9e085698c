"""A shim for Triton's `triton_python_backend_utils`, for the development server (dev_server.py): enough
of the Python backend's API to run a Triton Python model (nemo3's model.py) outside Triton, with
decoupled response senders. It is not Triton's Python backend.

`install()` registers this module under the real name, so `import triton_python_backend_utils as
pb_utils` in a model file gets it. Covered: Tensor, InferenceRequest (inputs, request_id,
get_response_sender, is_cancelled), InferenceResponse, the decoupled response sender (send with
flags, is_cancelled), TritonError with its codes, TritonModelException, get_input_tensor_by_name,
get_output_tensor_by_name, using_decoupled_model_transaction_policy, Logger,
TRITONSERVER_RESPONSE_COMPLETE_FINAL. Not covered: GPU tensors (DLPack), BLS, model-config
auto-completion.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
_log = logging.getLogger("triton_python_backend_utils")


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    """What a model raises from initialize/execute; Triton reports its message."""


class Tensor:
    def __init__(self, name: str, array):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:
        return True


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None):
        self._outputs, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class ResponseSender:
    """Decoupled sender: `deliver(response or None, flags)` is called for every send."""

    def __init__(self, deliver: Callable[[InferenceResponse | None, int], None], cancelled: threading.Event):
        self._deliver, self._cancelled = deliver, cancelled
        self._closed = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._lock:
            if self._closed:
                raise TritonModelException("the final response of this request was already sent")
            self._closed = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self._deliver(response, flags)

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()


class InferenceRequest:
    def __init__(self, inputs: list[Tensor], request_id: str, sender: ResponseSender, cancelled: threading.Event):
        self._inputs, self._id, self._sender, self._cancelled = inputs, request_id, sender, cancelled

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._id

    def get_response_sender(self) -> ResponseSender:
        return self._sender

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


class Logger:
    log_info = staticmethod(_log.info)
    log_warn = staticmethod(_log.warning)
    log_error = staticmethod(_log.error)
    log_verbose = staticmethod(_log.debug)


def install() -> None:
    """Make `import triton_python_backend_utils` resolve to this module."""
    sys.modules["triton_python_backend_utils"] = sys.modules[__name__]
