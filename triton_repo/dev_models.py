"""The models of the development server (dev_server.py): a repository's Python-backend models, run with
`python_backend_shim` standing in for `triton_python_backend_utils`, and its ensembles, run step by
step with every response of a decoupled step flowing on through the later steps.

One instance per model (instance_group counts are ignored), CPU tensors only, no dynamic batching.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import python_backend_shim as pb
from .dev_stats import ModelStats
from .kserve_wire import encode, wire_type

# deliver(outputs by name or None, error message or None, final)
Deliver = Callable[[dict | None, str | None, bool], None]


class ServedModel:
    """One loaded model: `infer(inputs, cancelled, deliver)` returns at once; responses go to `deliver`.

    `models` holds the models loaded so far: an ensemble's steps must be among them."""

    def __init__(self, model_dir: Path, config, models: dict[str, "ServedModel"]):
        self.dir, self.name, self.models = model_dir, model_dir.name, models
        self.config = config
        self.stats = ModelStats()
        self.instance = None
        if config.platform == "ensemble":
            self.steps = self._step_order()
            missing = sorted({s.model_name for s in self.steps} - set(models))
            if missing:
                raise ValueError(f"{self.dir}: ensemble step model(s) {missing} are not in the repository")
            # Triton marks an ensemble decoupled when a step is (core src/ensemble_scheduler/ensemble_utils.cc,
            # ValidateEnsembleConfig: model_transaction_policy.decoupled = any decoupled step on the data flow)
            self.config = type(config)()
            self.config.CopyFrom(config)
            self.config.model_transaction_policy.decoupled = any(models[s.model_name].decoupled for s in self.steps)
        else:
            self._load_python()

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled

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
        if self.config.backend != "python":
            raise ValueError(f"{self.dir}: backend {self.config.backend!r}: only python models and ensembles "
                             "are served")
        versions = sorted((p for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not versions:
            raise FileNotFoundError(f"{self.dir}: no version folder")
        path = versions[-1] / (self.config.default_model_filename or "model.py")
        if not path.exists():
            raise FileNotFoundError(f"{path}: the model's Python file is missing")
        pb.install()
        spec = importlib.util.spec_from_file_location(f"triton_model_{self.name}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            raise ValueError(f"{path}: cannot import it here ({e})") from e
        self.instance = module.TritonPythonModel()
        if hasattr(self.instance, "initialize"):
            self._initialize(versions[-1].name)

    def _initialize(self, version: str) -> None:
        from google.protobuf import json_format

        try:
            self.instance.initialize({
                "model_config": json.dumps(json_format.MessageToDict(self.config, preserving_proto_field_name=True)),
                "model_instance_kind": "CPU", "model_instance_name": f"{self.name}_0",
                "model_instance_device_id": "0", "model_repository": str(self.dir),
                "model_version": version, "model_name": self.name})
        except pb.TritonModelException as e:  # Triton would mark the model unavailable with this message
            raise ValueError(f"{self.dir}: {e}") from e

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
        start, failed = time.monotonic_ns(), []

        def counted(outputs, error, final):
            if error is not None:
                failed.append(error)
            if final:
                self.stats.record(not failed, start, time.monotonic_ns())
            deliver(outputs, error, final)

        if self.instance is None:
            threading.Thread(target=self._run_ensemble, args=(inputs, cancelled, counted), daemon=True).start()
        else:
            self._run_python(inputs, cancelled, counted)

    def _run_python(self, inputs: dict[str, np.ndarray], cancelled: threading.Event, deliver: Deliver) -> None:
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
        problem = self.check_inputs(inputs, {name: encode(array)[0] for name, array in inputs.items()})
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
            step_inputs = {key: tensors[value] for key, value in step.input_map.items() if value in tensors}
            for outputs in self.models[step.model_name].responses(step_inputs, cancelled):
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
        """As Triton's Python backend: the model's own `is_ready()` when it defines one (a failing check is not
        ready), else ready once loaded; an ensemble is ready when its steps are."""
        if self.config.platform == "ensemble":
            return all(self.models[s.model_name].ready() for s in self.steps)
        if self.instance is None or not hasattr(self.instance, "is_ready"):
            return True
        try:
            return self.instance.is_ready() is True
        except Exception:  # noqa: BLE001  (a model whose readiness check raises is not ready)
            return False

    def close(self) -> None:
        if self.instance is not None and hasattr(self.instance, "finalize"):
            self.instance.finalize()
