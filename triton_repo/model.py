"""nemo3's Triton Python-backend model: a decoupled model hosting the nemo3 runtime.

nemo3-build copies this file into the repository as `nemo3/1/model.py`; Triton's Python backend
runs it (it imports nemo3, so nemo3 must be installed where Triton runs). Everything it needs comes
from `config.pbtxt` parameters:

    build_dir             the build output folder (relative to the model's folder)
    server_factory        "module:function" returning a `serving_api.Server`
    tensor_parallel_size  ranks per instance
    device                "cuda" or "cpu"
    gpu_device_ids        "0,1;2,3": the GPUs of instance 0, 1, ... (cuda only)

Requests carry TensorRT-LLM's text-level tensors (text_input, max_tokens, stream, temperature,
top_k, top_p, seed, stop_words, exclude_input_in_output, min_tokens) plus think_budget and
num_speculative_tokens. Each request is served on its own thread: with `stream` true every runtime
delta becomes a response, otherwise one response carries the whole text; the last response has
the FINAL flag and the counts. A request the engine refuses or fails gets an error response and the
engine serves on; `is_ready` (Triton's model readiness) turns false if it cannot. A watcher thread
cancels in the runtime every request Triton marks cancelled (client gone, stream cancelled,
deadline passed).
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

CANCEL_POLL_S = 0.05


def _scalar(request, name: str, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"input {name!r}: expected one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


def _strings(request, name: str) -> tuple[str, ...]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ()
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1) if v)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("nemo3: config.pbtxt must set "
                                                "model_transaction_policy { decoupled: true }")
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        for key in ("build_dir", "server_factory", "tensor_parallel_size", "device"):
            if key not in params:
                raise pb_utils.TritonModelException(f"nemo3: config.pbtxt has no parameter {key!r}")
        device, tp = params["device"], int(params["tensor_parallel_size"])
        if device == "cuda":  # before anything initializes CUDA in this process
            groups = [g for g in params.get("gpu_device_ids", "").split(";") if g]
            match = re.search(r"_(\d+)$", args.get("model_instance_name", ""))
            instance = int(match.group(1)) if match else 0
            if instance >= len(groups):
                raise pb_utils.TritonModelException(f"nemo3: instance {instance} has no GPU group in parameter "
                                                    f"gpu_device_ids {params.get('gpu_device_ids', '')!r}")
            os.environ["CUDA_VISIBLE_DEVICES"] = groups[instance]
        from nemo3.triton_repo.serving_api import resolve_factory  # after CUDA_VISIBLE_DEVICES is set

        build_dir = (Path(args["model_repository"]) / params["build_dir"]).resolve()
        try:
            self.engine = resolve_factory(params["server_factory"])(build_dir, device, tp)
        except (ValueError, FileNotFoundError) as e:
            raise pb_utils.TritonModelException(f"nemo3: {e}") from e
        executor = getattr(getattr(self.engine, "engine", None), "executor", None)  # (the default factory's)
        if executor is not None:  # aot: the build's ahead-of-time engines; compiled: at load; eager
            pb_utils.Logger.log_info(f"nemo3: {build_dir}: decode steps run {executor.kind}")
        self.active: dict[str, object] = {}  # runtime request id -> Triton request
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch_cancellations, name="nemo3-cancel", daemon=True)
        self.watcher.start()

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), name="nemo3-request", daemon=True).start()
        return None

    def is_ready(self):
        """Triton's model readiness (the Python backend asks it for v2/models/<model>/ready): False once the
        engine cannot serve any request."""
        return bool(self.engine.ready())

    def finalize(self):
        self.stopping.set()
        self.watcher.join()
        self.engine.close()

    # ---- one request -----------------------------------------------------------------------------
    @staticmethod
    def _parse(request):
        from nemo3.triton_repo.serving_api import GenerationParams

        prompt = _scalar(request, "text_input")
        if prompt is None:
            raise ValueError("input 'text_input' is missing")
        max_tokens = _scalar(request, "max_tokens")
        if max_tokens is None:
            raise ValueError("input 'max_tokens' is missing")
        seed = _scalar(request, "seed")
        budget = _scalar(request, "think_budget")
        k = _scalar(request, "num_speculative_tokens")
        params = GenerationParams(
            max_tokens=int(max_tokens), min_tokens=int(_scalar(request, "min_tokens", 0)),
            temperature=float(_scalar(request, "temperature", 0.0)),
            top_k=int(_scalar(request, "top_k", 0)), top_p=float(_scalar(request, "top_p", 1.0)),
            seed=None if seed is None else int(seed), stop=_strings(request, "stop_words"),
            think_budget=None if budget is None else int(budget), num_speculative_tokens=None if k is None else int(k))
        stream = bool(_scalar(request, "stream", False))
        exclude_input = bool(_scalar(request, "exclude_input_in_output", False))
        return prompt, params, stream, exclude_input

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, params, stream, exclude_input = self._parse(request)
        except (ValueError, TypeError) as e:
            error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            return
        request_id = uuid.uuid4().hex
        with self.lock:
            self.active[request_id] = request
        text = "" if exclude_input or stream else prompt  # streaming never repeats the prompt (as TensorRT-LLM)
        generated = 0
        try:
            for delta in self.engine.stream(prompt, params, request_id):
                reason = delta.finish_reason.value if delta.finish_reason is not None else ""
                if reason in ("refused", "error"):  # never servable, or its step failed: this request's error
                    error = pb_utils.TritonError(f"nemo3: {delta.stats.get('error', f'request {reason}')}")
                    sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                    return
                text = delta.text if stream else text + delta.text
                generated += len(delta.token_ids)
                if stream or delta.finished:
                    stats = {"output_tokens": generated, **delta.stats}
                    sender.send(self._response(text, reason, stats), flags=final if delta.finished else 0)
                if delta.finished:
                    return
            raise RuntimeError("the engine's stream ended without a finished delta")
        except Exception as e:  # noqa: BLE001 - every failure must reach the client as this request's error
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"nemo3: {e}")), flags=final)
        finally:
            with self.lock:
                self.active.pop(request_id, None)

    @staticmethod
    def _response(text: str, reason: str, stats: dict):
        tensors = [
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([reason.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([stats.get("input_tokens", 0)], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([stats.get("output_tokens", 0)], dtype=np.int32)),
            pb_utils.Tensor("acceptance_length", np.array([stats.get("acceptance_length", 0.0)], dtype=np.float32)),
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _watch_cancellations(self):
        while not self.stopping.wait(CANCEL_POLL_S):
            with self.lock:
                cancelled = [rid for rid, request in self.active.items() if request.is_cancelled()]
                for request_id in cancelled:
                    del self.active[request_id]
            for request_id in cancelled:
                self.engine.cancel(request_id)
