"""An in-process KServe v2 gRPC server that serves a Triton model repository without Triton.

Built on tritonclient's `GRPCInferenceServiceServicer`, so any KServe v2 / Triton gRPC client talks
to it. It loads every model of a repository (each config.pbtxt through the validator's parser):
Python-backend models run their `<version>/model.py` with `python_backend_stub` standing in for
`triton_python_backend_utils`; ensembles run their steps in dependency order, every response of a
decoupled step flowing on through the later steps. Like Triton it checks request inputs against
the model config, reports unknown models, marks a stream's requests cancelled when the client
cancels the stream or its deadline passes, and sends an empty final response only to requests that
asked for one. One instance per model (instance_group counts are ignored), CPU tensors only.

Implemented RPCs: ServerLive, ServerReady, ServerMetadata, ModelReady (a Python model's `is_ready()`
when it has one, as Triton's Python backend), ModelMetadata, ModelConfig, ModelStreamInfer. Used by
the tests; usable by hand:

    with KServeTestServer("deploy/triton_repo") as server:
        print(server.url)   # 127.0.0.1:<free port>
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .. import __version__
from . import python_backend_stub as pb
from .validate import parse_model_config

# deliver(outputs by name or None, error message or None, final)
Deliver = Callable[[dict | None, str | None, bool], None]
_CHECK = object()


def wire_type(data_type: int) -> str:
    """Triton config DataType -> KServe datatype ("TYPE_STRING" -> "BYTES", "TYPE_FP32" -> "FP32")."""
    from tritonclient.grpc import model_config_pb2 as mc

    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _decode(tensor, raw: bytes | None) -> np.ndarray:
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    shape = list(tensor.shape)
    if tensor.datatype == "BYTES":
        values = deserialize_bytes_tensor(raw) if raw is not None else np.array(tensor.contents.bytes_contents,
                                                                                dtype=np.object_)
        return values.reshape(shape)
    dtype = triton_to_np_dtype(tensor.datatype)
    if raw is not None:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    contents = tensor.contents
    field_ = {"BOOL": "bool_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
              "UINT64": "uint64_contents", "UINT32": "uint_contents"}.get(tensor.datatype, "int_contents")
    return np.array(getattr(contents, field_), dtype=dtype).reshape(shape)


def _encode(array: np.ndarray) -> tuple[str, bytes]:
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    array = np.asarray(array)
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return "BYTES", serialize_byte_tensor(array.astype(np.object_)).item()
    return np_to_triton_dtype(array.dtype), np.ascontiguousarray(array).tobytes()


class ServedModel:
    """One loaded model: `infer(inputs, cancelled, deliver)` returns at once; responses go to `deliver`."""

    def __init__(self, server: "KServeTestServer", model_dir: Path, config):
        self.server, self.dir, self.config, self.name = server, model_dir, config, model_dir.name
        self.decoupled = config.model_transaction_policy.decoupled
        self.instance = None
        if config.platform == "ensemble":
            self.steps = self._step_order()
        else:
            self._load_python()

    def _step_order(self) -> list:
        """Ensemble steps in dependency order: a step comes after the steps producing what it reads."""
        ordered, ready = [], {t.name for t in self.config.input}
        pending = list(self.config.ensemble_scheduling.step)
        while pending:
            step = next((s for s in pending if set(s.input_map.values()) <= ready), pending[0])
            pending.remove(step)
            ordered.append(step)
            ready |= set(step.output_map.values())
        return ordered

    def _load_python(self) -> None:
        from google.protobuf import json_format

        if self.config.backend != "python":
            raise ValueError(f"{self.dir}: backend {self.config.backend!r}: only python models and ensembles "
                             "are served")
        versions = sorted((p for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not versions:
            raise FileNotFoundError(f"{self.dir}: no version folder")
        path = versions[-1] / (self.config.default_model_filename or "model.py")
        pb.install()
        spec = importlib.util.spec_from_file_location(f"triton_model_{self.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.instance = module.TritonPythonModel()
        if hasattr(self.instance, "initialize"):
            self.instance.initialize({
                "model_config": json.dumps(json_format.MessageToDict(self.config, preserving_proto_field_name=True)),
                "model_instance_kind": "CPU", "model_instance_name": f"{self.name}_0",
                "model_instance_device_id": "0", "model_repository": str(self.dir),
                "model_version": versions[-1].name, "model_name": self.name})

    def check_inputs(self, inputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> str | None:
        """Triton's request checks: the error message, or None."""
        declared = {t.name: t for t in self.config.input}
        for name in inputs:
            if name not in declared:
                return f"[request id: <id_unknown>] unexpected inference input '{name}' for model '{self.name}'"
            expected = wire_type(declared[name].data_type)
            if datatypes.get(name, expected) != expected:
                return (f"[request id: <id_unknown>] inference input '{name}' data-type is '{datatypes[name]}', "
                        f"but model '{self.name}' expects '{expected}'")
        missing = [n for n, t in declared.items() if not t.optional and n not in inputs]
        if missing:
            return f"[request id: <id_unknown>] expected {len(declared)} inputs but got {len(inputs)} inputs for " \
                   f"model '{self.name}'. Got input(s) {sorted(inputs)}, but missing required input(s) {missing}."
        return None

    def infer(self, inputs: dict[str, np.ndarray], cancelled: threading.Event, deliver: Deliver) -> None:
        if self.instance is None:
            threading.Thread(target=self._run_ensemble, args=(inputs, cancelled, deliver), daemon=True).start()
            return

        def send(response, flags):
            outputs = None if response is None else {t.name(): t.as_numpy() for t in response.output_tensors()}
            error = response.error().message() if response is not None and response.has_error() else None
            deliver(None if error else outputs, error, bool(flags & pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

        request = pb.InferenceRequest([pb.Tensor(n, a) for n, a in inputs.items()], "",
                                      pb.ResponseSender(send, cancelled), cancelled)
        try:
            responses = self.instance.execute([request])
        except Exception as e:  # noqa: BLE001 - the model's failure is this request's error
            deliver(None, f"{self.name}: {e}", True)
            return
        if not self.decoupled:
            for response in responses or []:
                send(response, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def responses(self, inputs: dict[str, np.ndarray], cancelled: threading.Event) -> Iterator[dict]:
        """Blocking view of `infer`: yields each response's outputs; raises RuntimeError on an error."""
        problem = self.check_inputs(inputs, {name: _encode(array)[0] for name, array in inputs.items()})
        if problem:
            raise RuntimeError(problem)
        box: queue.Queue = queue.Queue()
        self.infer(inputs, cancelled, lambda outputs, error, final: box.put((outputs, error, final)))
        while True:
            outputs, error, final = box.get()
            if error:
                raise RuntimeError(error)
            if outputs is not None:
                yield outputs
            if final:
                return

    def _run_ensemble(self, inputs: dict[str, np.ndarray], cancelled: threading.Event, deliver: Deliver) -> None:
        steps, wanted = self.steps, [t.name for t in self.config.output]

        def run(i: int, tensors: dict) -> Iterator[dict]:
            if i == len(steps):
                yield {name: tensors[name] for name in wanted if name in tensors}
                return
            step = steps[i]
            model = self.server.models[step.model_name]
            step_inputs = {key: tensors[value] for key, value in step.input_map.items() if value in tensors}
            for outputs in model.responses(step_inputs, cancelled):
                merged = dict(tensors)
                merged.update({value: outputs[key] for key, value in step.output_map.items() if key in outputs})
                yield from run(i + 1, merged)

        try:
            for outputs in run(0, inputs):
                deliver(outputs, None, False)
        except (RuntimeError, KeyError) as e:
            deliver(None, str(e), True)
            return
        deliver(None, None, True)

    def ready(self) -> bool:
        """As Triton's Python backend: the model's own `is_ready()` when it defines one (a failing check is
        not ready), else ready once loaded."""
        if self.instance is None or not hasattr(self.instance, "is_ready"):
            return True
        try:
            return self.instance.is_ready() is True
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        if self.instance is not None and hasattr(self.instance, "finalize"):
            self.instance.finalize()


class KServeTestServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: str | Path, host: str = "127.0.0.1", port: int = 0, workers: int = 64):
        self.repository, self.host, self.port, self.workers = Path(repository), host, port, workers
        self.models: dict[str, ServedModel] = {}
        self._server = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "KServeTestServer":
        folders = sorted(p for p in self.repository.iterdir() if (p / "config.pbtxt").exists())
        configs = {p: parse_model_config(p / "config.pbtxt") for p in folders}
        # composing models first, so an ensemble's steps exist when it is served
        for folder, config in sorted(configs.items(), key=lambda kv: kv[1].platform == "ensemble"):
            self.models[folder.name] = ServedModel(self, folder, config)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kserve"))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
        for model in self.models.values():
            model.close()
        self.models.clear()

    def __enter__(self) -> "KServeTestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- health and metadata ----------------------------------------------------------------------
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="nemo3-kserve-test-server", version=__version__)

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

    # ---- streaming inference ----------------------------------------------------------------------
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

        threading.Thread(target=read, name="kserve-stream-reader", daemon=True).start()
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

        model = self.models.get(request.model_name)
        if model is None:
            return error(f"Request for unknown model: '{request.model_name}' is not found")
        raw = list(request.raw_input_contents)
        try:
            inputs = {t.name: _decode(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}
        except ValueError as e:
            return error(f"bad input tensor: {e}")
        problem = model.check_inputs(inputs, {t.name: t.datatype for t in request.inputs})
        if problem:
            return error(problem.replace("<id_unknown>", request.id or "<id_unknown>"))
        empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
            if "triton_enable_empty_final_response" in request.parameters else False
        requested = {o.name for o in request.outputs}

        def deliver(outputs, message, final):
            if message is not None:
                error(message)
            elif outputs is not None or (final and empty_final):
                response = service_pb2.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
                for name, array in (outputs or {}).items():
                    if requested and name not in requested:
                        continue
                    datatype, data = _encode(array)
                    response.outputs.add(name=name, datatype=datatype, shape=list(np.shape(array)))
                    response.raw_output_contents.append(data)
                response.parameters["triton_final_response"].bool_param = final
                out.put(service_pb2.ModelStreamInferResponse(infer_response=response))
            if final:
                finished()

        model.infer(inputs, cancelled, deliver)
        return True
