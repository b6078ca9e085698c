"""`nemo3 serve`: a KServe v2 gRPC development server for a generated model repository, where Triton is
not installed. It is NOT Triton Inference Server: no GPU tensors, batching, instance groups, HTTP,
shared memory or metrics; deploy with Triton (the repository's README.md).

Built on tritonclient's `GRPCInferenceServiceServicer`, so any KServe v2 / Triton gRPC client talks to
it (nemo3 client, nemo3 bench --server, perf_analyzer, genai-perf). It loads every model of the
repository (each config.pbtxt through the validator's parser; models in dev_models.py) and answers as
Triton does wherever a client can tell:
- request inputs are checked against the model config; unknown models are reported;
- an ensemble with a decoupled step is reported decoupled (dev_models.py);
- a stream's requests are cancelled when the client cancels the stream or its deadline passes, and
  an empty final response goes only to requests that asked for one;
- unary ModelInfer answers non-decoupled models and refuses decoupled ones with Triton's error;
- ServerMetadata lists the extensions implemented, `statistics` among them, and ModelStatistics
  returns per-model counts (dev_stats.py).

RPCs: ServerLive, ServerReady, ServerMetadata, ModelReady (a Python model's `is_ready()` when it has one, as
Triton's Python backend), ModelMetadata, ModelConfig,
ModelStatistics, ModelInfer, ModelStreamInfer.

    with DevServer("deploy/triton_repo") as server:
        print(server.url)   # 127.0.0.1:<free port>
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .. import __version__
from .dev_models import ServedModel
from .kserve_wire import decode, infer_response, wire_type
from .validate import parse_model_config

SERVER_NAME = "nemo3-dev-server (not Triton)"
# Triton lists its extensions in ServerMetadata (core src/server.cc, InferenceServer::InferenceServer; server
# src/grpc/grpc_server.cc, OnExecuteServerMetadata, copies them into the response): the ones implemented here.
EXTENSIONS = ("model_configuration", "parameters", "statistics")
# server src/grpc/infer_handler.cc, ModelInferHandler::Execute: TRITONSERVER_ERROR_UNSUPPORTED, which
# src/grpc/grpc_utils.cc (GrpcStatusUtil::CodeToStatus) sends as UNIMPLEMENTED
DECOUPLED_UNARY = "ModelInfer RPC doesn't support models with decoupled transaction policy"
_CHECK = object()


class DevServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: str | Path, host: str = "127.0.0.1", port: int = 0, workers: int = 64):
        self.repository, self.host, self.port, self.workers = Path(repository), host, port, workers
        self.models: dict[str, ServedModel] = {}
        self._server = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "DevServer":
        if not self.repository.is_dir():
            raise FileNotFoundError(f"{self.repository}: no such model repository")
        folders = sorted(p for p in self.repository.iterdir() if (p / "config.pbtxt").exists())
        configs = {p: parse_model_config(p / "config.pbtxt") for p in folders}
        try:  # composing models first, so an ensemble's steps exist when it is loaded
            for folder, config in sorted(configs.items(), key=lambda kv: kv[1].platform == "ensemble"):
                self.models[folder.name] = ServedModel(folder, config, self.models)
        except Exception:
            self.stop()
            raise
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kserve"))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        self._server.start()
        return self

    def wait(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
        for model in self.models.values():
            model.close()
        self.models.clear()

    def __enter__(self) -> "DevServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- health, metadata, statistics -------------------------------------------------------------
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def ModelReady(self, request, context):
        model = self.models.get(request.name)
        return service_pb2.ModelReadyResponse(ready=model is not None and model.ready())

    def _model(self, name: str, context) -> ServedModel:
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        return self.models[name]

    def ModelMetadata(self, request, context):
        model = self._model(request.name, context)
        meta = service_pb2.ModelMetadataResponse
        return meta(name=model.name, versions=["1"], platform=model.config.platform or model.config.backend,
                    inputs=[meta.TensorMetadata(name=t.name, datatype=wire_type(t.data_type), shape=list(t.dims))
                            for t in model.config.input],
                    outputs=[meta.TensorMetadata(name=t.name, datatype=wire_type(t.data_type), shape=list(t.dims))
                             for t in model.config.output])

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self._model(request.name, context).config)

    def ModelStatistics(self, request, context):
        # core src/tritonserver.cc, TRITONSERVER_ServerModelStatistics: every ready model when no name is
        # given, else that model, or INVALID_ARG "requested model '<name>' is not available"
        if request.name and request.name not in self.models:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requested model '{request.name}' is not available")
        if request.version and request.version != "1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"requested model version is not available for model '{request.name}'")
        names = [request.name] if request.name else sorted(self.models)
        return service_pb2.ModelStatisticsResponse(model_stats=[self.models[n].stats.message(n) for n in names])

    # ---- inference ---------------------------------------------------------------------------------
    def _prepare(self, request) -> tuple[ServedModel | None, dict | None, str | None]:
        """(model, inputs, None), or an error message as Triton words it."""
        model = self.models.get(request.model_name)
        if model is None:
            return None, None, f"Request for unknown model: '{request.model_name}' is not found"
        raw = list(request.raw_input_contents)
        try:
            inputs = {t.name: decode(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}
        except ValueError as e:
            return model, None, f"bad input tensor: {e}"
        problem = model.check_inputs(inputs, {t.name: t.datatype for t in request.inputs})
        if problem:
            return model, None, problem.replace("<id_unknown>", request.id or "<id_unknown>")
        return model, inputs, None

    def ModelInfer(self, request, context):
        model = self._model(request.model_name, context)
        if model.decoupled:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, DECOUPLED_UNARY)
        model, inputs, problem = self._prepare(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        box: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        model.infer(inputs, cancelled, lambda outputs, error, final: box.put((outputs, error, final)))
        answer, error = {}, None
        while True:  # a non-decoupled model sends one response, FINAL
            outputs, message, final = box.get()
            answer.update(outputs or {})
            error = error or message
            if final:
                break
        if error:
            context.abort(grpc.StatusCode.INTERNAL, error)
        return infer_response(model.name, request.id, answer, {o.name for o in request.outputs})

    def ModelStreamInfer(self, request_iterator, context):
        out: queue.Queue = queue.Queue()
        cancelled = threading.Event()  # the stream's requests are cancelled together, as in Triton
        pending: set[int] = set()
        state = {"reading": True, "next": 0}
        lock = threading.Lock()

        def on_rpc_done():
            cancelled.set()
            out.put(None)

        context.add_callback(on_rpc_done)

        def read():
            try:
                for request in request_iterator:
                    with lock:
                        key = state["next"]
                        state["next"] += 1
                        pending.add(key)
                    if not self._dispatch(request, cancelled, out, lambda k=key: self._finish(k, pending, lock, out)):
                        self._finish(key, pending, lock, out)
            except Exception:  # noqa: BLE001 - a cancelled RPC ends the request stream with an error
                pass
            with lock:
                state["reading"] = False
            out.put(_CHECK)

        threading.Thread(target=read, name="dev-server-stream-reader", daemon=True).start()
        while True:
            item = out.get()
            if item is None:
                return
            if item is _CHECK:
                with lock:
                    if not state["reading"] and not pending:
                        return
                continue
            yield item

    @staticmethod
    def _finish(key: int, pending: set, lock: threading.Lock, out: queue.Queue) -> None:
        with lock:
            pending.discard(key)
        out.put(_CHECK)

    def _dispatch(self, request, cancelled: threading.Event, out: queue.Queue, finished: Callable[[], None]) -> bool:
        """Start one request; False if it was answered at once (an error)."""
        def error(message: str) -> bool:
            out.put(service_pb2.ModelStreamInferResponse(
                error_message=message, infer_response=service_pb2.ModelInferResponse(model_name=request.model_name,
                                                                                     id=request.id)))
            return False

        model, inputs, problem = self._prepare(request)
        if problem:
            return error(problem)
        empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
            if "triton_enable_empty_final_response" in request.parameters else False
        requested = {o.name for o in request.outputs}

        def deliver(outputs, message, final):
            if message is not None:
                error(message)
            elif outputs is not None or (final and empty_final):
                response = infer_response(model.name, request.id, outputs or {}, requested)
                response.parameters["triton_final_response"].bool_param = final
                out.put(service_pb2.ModelStreamInferResponse(infer_response=response))
            if final:
                finished()

        model.infer(inputs, cancelled, deliver)
        return True
