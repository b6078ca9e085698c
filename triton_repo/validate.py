"""Check a Triton model repository before a server sees it.

Every `config.pbtxt` is parsed into Triton's own `ModelConfig` protobuf (tritonclient ships it) with
`google.protobuf.text_format`: an unknown field, a bad enum value or an unfilled `${...}`
placeholder is an error naming the file, line and field. Then what Triton would reject at load
time or at the first request: names, data types, dims, version folders and model files,
parameters that name files or folders (relative paths are relative to the model's folder), GPU
groups against the tensor-parallel size, every ensemble step's tensors (each exists on both sides
with the same data type and compatible dims), and TensorRT-LLM LLM-API `model.yaml` files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{[^}]*\}")
PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_filename")
MAMBA_SSM_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")
SPECULATIVE_DECODING_TYPES = ("MTP", "Eagle", "Eagle3", "NGram", "Draft_Target", "PARD", "AUTO", "Medusa")
# TensorRT-LLM's LLM-API Triton model: a `tensorrt_llm/1/` next to a model.yaml needs these, copied by hand
LLMAPI_FILES = ("model.py", "helpers.py")
LLMAPI_SOURCE = "TensorRT-LLM/triton_backend/all_models/llmapi/tensorrt_llm/1"


class RepositoryError(ValueError):
    """A repository Triton would reject; the message names the file and the field."""


@dataclass
class RepositoryReport:
    path: Path
    label: str  # how messages name the repository folder
    models: dict = field(default_factory=dict)  # name -> ModelConfig
    unparsed: set[str] = field(default_factory=set)  # models whose config.pbtxt did not parse (already reported)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> "RepositoryReport":
        if self.errors:
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise RepositoryError(self.errors[0] + more)
        return self


def _field_before(text: str) -> str | None:
    """The last `field:` of a text-format fragment, e.g. 'input [ { name: "a" data_type: ' -> data_type."""
    names = re.findall(r"([A-Za-z_]\w*)\s*:", text)
    return names[-1] if names else None


def parse_model_config(path: Path, label: str | None = None):
    """`config.pbtxt` -> `ModelConfig`; RepositoryError '<label>:<line>: <field>: <problem>' otherwise."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    label = label or str(path)
    text = Path(path).read_text()
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        hit = PLACEHOLDER.search(code)
        if hit:
            name = _field_before(code[:hit.start()])
            keys = re.findall(r'key\s*:\s*"([^"]*)"', "\n".join(text.splitlines()[:number]))
            if name == "string_value" and keys:
                name = f"parameters[{keys[-1]}]"
            raise RepositoryError(f"{label}:{number}: {name or '?'}: unfilled placeholder {hit.group()}")
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        line_no, col = e.GetLine() or 0, e.GetColumn() or 0
        line = text.splitlines()[line_no - 1] if 0 < line_no <= len(text.splitlines()) else ""
        detail = re.sub(r"^\d+:\d+ : ", "", str(e))
        detail = detail.removeprefix(f"'{line}': ")
        unknown = re.search(r'has no field named "(\w+)"', detail)
        name = unknown.group(1) if unknown else _field_before(line[:max(col - 1, 0)])
        raise RepositoryError(f"{label}:{line_no}: {name or '?'}: {detail}") from None


def validate_repository(folder: str | Path, label: str | None = None, complete: bool = True) -> RepositoryReport:
    """Collect every problem of the repository at `folder` (nothing raised for a bad config).
    Messages name files as `<label>/<model>/config.pbtxt` (label: the folder's name). `complete=False`:
    a TensorRT-LLM model folder may still lack the model code copied in by hand (a note, not an error;
    how the build checks the repository it just wrote)."""
    folder = Path(folder)
    report = RepositoryReport(folder, label or folder.name)
    if not folder.is_dir():
        report.errors.append(f"{folder}: not a folder")
        return report
    for model_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = f"{report.label}/{model_dir.name}/config.pbtxt"
        if not (model_dir / "config.pbtxt").exists():
            report.errors.append(f"{report.label}/{model_dir.name}: no config.pbtxt")
            continue
        try:
            report.models[model_dir.name] = parse_model_config(model_dir / "config.pbtxt", label)
        except RepositoryError as e:
            report.errors.append(str(e))
            report.unparsed.add(model_dir.name)
    if not report.models and not report.errors:
        report.errors.append(f"{folder}: no models (folders with a config.pbtxt)")
    for name, config in report.models.items():
        checker = _ModelChecker(report, folder / name, config, complete)
        checker.check()
    return report


def check_repository(folder: str | Path, label: str | None = None, complete: bool = True) -> RepositoryReport:
    """`validate_repository`, raising RepositoryError on the first problem."""
    return validate_repository(folder, label, complete).raise_for_errors()


def _type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.DataType.Name(data_type)


def _dims_compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


class _ModelChecker:
    def __init__(self, report: RepositoryReport, model_dir: Path, config, complete: bool = True):
        self.report, self.dir, self.config, self.complete = report, model_dir, config, complete
        self.label = f"{report.label}/{model_dir.name}/config.pbtxt"

    def error(self, field_: str, problem: str, file: str | None = None) -> None:
        self.report.errors.append(f"{file or self.label}: {field_}: {problem}")

    def check(self) -> None:
        c = self.config
        if c.name and c.name != self.dir.name:
            self.error("name", f"{c.name!r} differs from the model's folder name {self.dir.name!r}")
        if bool(c.backend) == bool(c.platform):
            self.error("backend", "exactly one of backend and platform must be set")
        if c.max_batch_size < 0:
            self.error("max_batch_size", f"{c.max_batch_size} < 0")
        self._check_tensors("input", c.input)
        self._check_tensors("output", c.output)
        for i, group in enumerate(c.instance_group):
            if group.count < 0 or any(g < 0 for g in group.gpus):
                self.error(f"instance_group[{i}]", "count and gpus must be >= 0")
        for key, value in c.parameters.items():
            self._check_parameter(key, value.string_value)
        if c.platform == "ensemble":
            self._check_ensemble()
        else:
            self._check_versions()
        self._check_gpu_groups()

    def _check_tensors(self, kind: str, tensors) -> None:
        seen = set()
        for t in tensors:
            where = f"{kind} {t.name!r}" if t.name else kind
            if not t.name or t.name in seen:
                self.error(where, "missing or duplicate name")
            seen.add(t.name)
            if t.data_type == 0:
                self.error(where, "data_type is not set (TYPE_INVALID)")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                self.error(where, f"dims {list(t.dims)}: each must be > 0 or -1")

    def _check_parameter(self, key: str, value: str) -> None:
        if key == "server_factory":
            from .serving_api import check_factory_spec

            try:
                check_factory_spec(value)
            except ValueError as e:
                self.error(f"parameters[{key}]", str(e))
        elif key == "tensor_parallel_size" and not (value.isdigit() and int(value) >= 1):
            self.error(f"parameters[{key}]", f"{value!r} is not an integer >= 1")
        elif key == "device" and value not in ("cuda", "cpu"):
            self.error(f"parameters[{key}]", f"{value!r}: expected cuda or cpu")
        elif key == "gpu_device_ids" and not re.fullmatch(r"\d+(,\d+)*(;\d+(,\d+)*)*", value):
            self.error(f"parameters[{key}]", f"{value!r}: expected GPU ids like '0,1;2,3' (';' between instances)")
        elif key.lower().endswith(PATH_KEY_SUFFIXES) and value:
            path = Path(value.replace("$$TRITON_MODEL_DIRECTORY", str(self.dir)))
            path = path if path.is_absolute() else self.dir / path
            if not path.exists():
                self.error(f"parameters[{key}]", f"{value!r} does not exist ({path.resolve()})")

    def _check_gpu_groups(self) -> None:
        params = {k: v.string_value for k, v in self.config.parameters.items()}
        ids = params.get("gpu_device_ids")
        if not ids or not re.fullmatch(r"\d+(,\d+)*(;\d+(,\d+)*)*", ids):
            return
        groups = [g.split(",") for g in ids.split(";")]
        instances = sum(max(g.count, 1) for g in self.config.instance_group) or 1
        if len(groups) != instances:
            self.error("parameters[gpu_device_ids]", f"{len(groups)} GPU groups for {instances} model instances")
        tp = params.get("tensor_parallel_size", "")
        if tp.isdigit() and any(len(g) != int(tp) for g in groups):
            self.error("parameters[gpu_device_ids]", f"every group needs tensor_parallel_size={tp} GPUs: {ids!r}")
        flat = [g for group in groups for g in group]
        if len(set(flat)) != len(flat):
            self.error("parameters[gpu_device_ids]", f"a GPU is listed twice: {ids!r}")

    def _check_versions(self) -> None:
        versions = sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())
        if not versions:
            self.report.errors.append(f"{self.report.label}/{self.dir.name}: no version folder (e.g. 1/)")
            return
        for version in versions:
            where = f"{self.report.label}/{self.dir.name}/{version.name}"
            if (version / "model.yaml").exists():
                self._check_model_yaml(version / "model.yaml", f"{where}/model.yaml")
            if self.config.backend != "python":
                continue
            if (version / "model.yaml").exists():
                self._check_llmapi_code(version, where)
                continue
            filename = self.config.default_model_filename or "model.py"
            if not (version / filename).exists():
                self.report.errors.append(f"{where}: no {filename} for the python backend")

    def _check_llmapi_code(self, version: Path, where: str) -> None:
        """TensorRT-LLM's LLM-API model.py and helpers.py, which the repository cannot ship."""
        missing = [name for name in LLMAPI_FILES if not (version / name).exists()]
        if not missing:
            return
        copy = f"cp {' '.join(f'{LLMAPI_SOURCE}/{name}' for name in missing)} {version}/"
        if self.complete:
            self.report.errors.append(f"{where}: missing {' and '.join(missing)} (TensorRT-LLM's LLM-API Triton "
                                      f"model, from the container's TensorRT-LLM release); copy them: {copy}")
        else:
            self.report.notes.append(f"{where}/{missing[0]}: not there yet; copy TensorRT-LLM's LLM-API "
                                     "model.py and helpers.py into it (README.md)")

    def _check_model_yaml(self, path: Path, label: str) -> None:
        import yaml

        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            hit = PLACEHOLDER.search(line.split("#", 1)[0])
            if hit:
                self.error(_field_before(line[:hit.start()]) or "?", f"unfilled placeholder {hit.group()}",
                           f"{label}:{number}")
                return
        try:
            args = yaml.safe_load(text)
        except yaml.YAMLError as e:
            self.error("?", f"not YAML ({str(e).splitlines()[0]})", label)
            return
        if not isinstance(args, dict):
            self.error("?", "expected a mapping of LLM-API arguments", label)
            return
        for key in ("model", "backend", "tensor_parallel_size", "triton_config"):
            if key not in args:
                self.error(key, "required key is missing", label)
        if args.get("backend", "pytorch") != "pytorch":
            self.error("backend", f"{args['backend']!r}: the LLM-API Triton model runs the pytorch backend", label)
        self._check_llm_parallel(args, label)
        self._check_llm_caches(args, label)
        triton = args.get("triton_config")
        if isinstance(triton, dict):
            for key in ("max_batch_size", "decoupled"):
                if key not in triton:
                    self.error(f"triton_config.{key}", "required key is missing", label)
            if "decoupled" in triton and bool(triton["decoupled"]) != self.config.model_transaction_policy.decoupled:
                self.error("triton_config.decoupled", f"{triton['decoupled']} but config.pbtxt says "
                           f"{self.config.model_transaction_policy.decoupled}", label)
            if "max_batch_size" in triton and triton["max_batch_size"] != self.config.max_batch_size:
                self.error("triton_config.max_batch_size", f"{triton['max_batch_size']} but config.pbtxt says "
                           f"{self.config.max_batch_size}", label)
        elif "triton_config" in args:
            self.error("triton_config", "expected a mapping", label)
        model = args.get("model")
        if isinstance(model, str) and Path(model).is_absolute():
            if not (Path(model) / "config.json").exists():
                self.error("model", f"{model}: no checkpoint there (config.json missing)", label)
        elif isinstance(model, str):
            self.report.notes.append(f"{label}: model {model!r} is not an absolute path: TensorRT-LLM reads it as "
                                     "a Hugging Face id or relative to tritonserver's working folder")

    def _check_llm_parallel(self, args: dict, label: str) -> None:
        sizes = {k: args.get(k) for k in ("tensor_parallel_size", "moe_expert_parallel_size",
                                          "moe_tensor_parallel_size", "pipeline_parallel_size")}
        for key, value in sizes.items():
            if value is not None and not (isinstance(value, int) and value >= 1):
                self.error(key, f"{value!r} is not an integer >= 1", label)
                return
        tp, ep, moe_tp = (sizes["tensor_parallel_size"], sizes["moe_expert_parallel_size"],
                          sizes["moe_tensor_parallel_size"])
        if tp and ep and moe_tp and ep * moe_tp != tp:
            self.error("moe_expert_parallel_size", f"{ep} x moe_tensor_parallel_size {moe_tp} != "
                       f"tensor_parallel_size {tp}", label)

    def _check_llm_caches(self, args: dict, label: str) -> None:
        kv = args.get("kv_cache_config", {})
        if not isinstance(kv, dict):
            self.error("kv_cache_config", "expected a mapping", label)
            return
        fraction = kv.get("free_gpu_memory_fraction")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            self.error("kv_cache_config.free_gpu_memory_fraction", f"{fraction!r} is not in (0, 1]", label)
        if kv.get("mamba_ssm_cache_dtype", "auto") not in MAMBA_SSM_CACHE_DTYPES:
            self.error("kv_cache_config.mamba_ssm_cache_dtype",
                       f"{kv['mamba_ssm_cache_dtype']!r}: expected one of {', '.join(MAMBA_SSM_CACHE_DTYPES)}", label)
        spec = args.get("speculative_config")
        if spec is None:
            return
        if not isinstance(spec, dict) or spec.get("decoding_type") not in SPECULATIVE_DECODING_TYPES:
            self.error("speculative_config.decoding_type", f"expected one of {', '.join(SPECULATIVE_DECODING_TYPES)}",
                       label)
        elif spec["decoding_type"] == "MTP":
            layers = spec.get("num_nextn_predict_layers", 1)
            if not (isinstance(layers, int) and layers >= 1):
                self.error("speculative_config.num_nextn_predict_layers", f"{layers!r} is not an integer >= 1", label)

    def _check_ensemble(self) -> None:
        c, models = self.config, self.report.models
        steps = list(c.ensemble_scheduling.step)
        if not steps:
            self.error("ensemble_scheduling", "an ensemble needs at least one step")
            return
        # tensor name -> (data_type, dims, who) for every tensor the ensemble knows
        known = {t.name: (t.data_type, list(t.dims), f"ensemble input {t.name!r}") for t in c.input}
        produced: dict[str, str] = {}
        for i, step in enumerate(steps):
            model = models.get(step.model_name)
            if step.model_name in self.report.unparsed:
                return  # its parse error is reported; its tensors are unknown
            if model is None:
                self.error(f"ensemble_scheduling.step[{i}].model_name",
                           f"{step.model_name!r} is not a model of this repository")
                continue
            outputs = {t.name: t for t in model.output}
            for key, value in step.output_map.items():
                if key not in outputs:
                    self.error(f"ensemble_scheduling.step[{i}].output_map[{key}]",
                               f"{step.model_name!r} has no output {key!r}")
                    continue
                if value in produced or value in known:
                    self.error(f"ensemble_scheduling.step[{i}].output_map[{key}]",
                               f"tensor {value!r} is already produced by {produced.get(value, 'the ensemble input')}")
                produced[value] = f"step {i} ({step.model_name})"
                known[value] = (outputs[key].data_type, list(outputs[key].dims), f"{step.model_name} output {key!r}")
        for i, step in enumerate(steps):
            model = models.get(step.model_name)
            if model is None:
                continue
            inputs = {t.name: t for t in model.input}
            for key, value in step.input_map.items():
                where = f"ensemble_scheduling.step[{i}].input_map[{key}]"
                if key not in inputs:
                    self.error(where, f"{step.model_name!r} has no input {key!r}")
                elif value not in known:
                    self.error(where, f"tensor {value!r} is neither an ensemble input nor any step's output")
                else:
                    self._same_type(where, known[value], inputs[key], f"{step.model_name} input {key!r}")
            for name, t in inputs.items():
                if not t.optional and name not in step.input_map:
                    self.error(f"ensemble_scheduling.step[{i}].input_map",
                               f"required input {name!r} of {step.model_name!r} is not mapped")
        for t in c.output:
            if t.name not in produced:
                self.error(f"output {t.name!r}", "no step produces it")
            else:
                self._same_type(f"output {t.name!r}", known[t.name], t, f"ensemble output {t.name!r}")
        used = {v for s in steps for v in s.input_map.values()}
        for t in c.input:
            if t.name not in used:
                self.report.notes.append(f"{self.label}: ensemble input {t.name!r} is not used by any step")

    def _same_type(self, where: str, source: tuple, target, target_label: str) -> None:
        data_type, dims, source_label = source
        if data_type != target.data_type:
            self.error(where, f"{source_label} is {_type_name(data_type)} but {target_label} is "
                              f"{_type_name(target.data_type)}")
        elif not _dims_compatible(dims, list(target.dims)):
            self.error(where, f"{source_label} has dims {dims} but {target_label} has {list(target.dims)}")
