"""Triton repository generation and validation: every generated config.pbtxt parses into Triton's own
ModelConfig (tritonclient's protobuf), carries TensorRT-LLM's tensor names and types, and the
validator names the file and field of every corruption Triton would reject."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import hf_model, make_config, save_hf_checkpoint
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from nemo3.cli.main import main as cli
from nemo3.pipeline import BuildOptions, run_stages
from nemo3.triton_repo import generate as generate_module
from nemo3.triton_repo.generate import HEADER, RepositoryOptions, write_repository
from nemo3.triton_repo.validate import LLMAPI_SOURCE, RepositoryError, check_repository, validate_repository

# TensorRT-LLM's text-level tensors (triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt)
TRTLLM_ENSEMBLE = {"text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL",
                   "temperature": "TYPE_FP32", "top_k": "TYPE_INT32", "top_p": "TYPE_FP32", "seed": "TYPE_UINT64",
                   "stop_words": "TYPE_STRING", "exclude_input_in_output": "TYPE_BOOL", "text_output": "TYPE_STRING",
                   "num_input_tokens": "TYPE_INT32", "num_output_tokens": "TYPE_INT32", "min_tokens": "TYPE_INT32"}
# What TensorRT-LLM's LLM-API model.py / helpers.py read (triton_backend/all_models/llmapi/tensorrt_llm)
TRTLLM_LLMAPI = {"text_input": "TYPE_STRING", "streaming": "TYPE_BOOL", "sampling_param_max_tokens": "TYPE_INT32",
                 "sampling_param_temperature": "TYPE_FP32", "sampling_param_top_k": "TYPE_INT32",
                 "sampling_param_top_p": "TYPE_FP32", "sampling_param_seed": "TYPE_UINT64",
                 "sampling_param_stop": "TYPE_STRING", "sampling_param_exclude_input_from_output": "TYPE_BOOL",
                 "return_finish_reason": "TYPE_BOOL", "stop": "TYPE_BOOL", "text_output": "TYPE_STRING",
                 "finish_reason": "TYPE_STRING"}


@pytest.fixture
def checkpoint_dir(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def generate(root, **kwargs):
    """A repository at root/build/triton_repo (build_dir ../.. is root/build)."""
    (root / "build").mkdir(exist_ok=True)
    repo = root / "build" / "triton_repo"
    write_repository(repo, RepositoryOptions(**kwargs))
    return repo


def tensors(config) -> dict[str, str]:
    return {t.name: mc.DataType.Name(t.data_type) for t in list(config.input) + list(config.output)}


@pytest.mark.parametrize("target,tp,replicas,mtp", [("torch", 1, 1, 0), ("tensorrt", 2, 2, 0), ("trtllm", 1, 1, 0),
                                                    ("trtllm", 4, 2, 3)])
def test_every_generated_config_parses_into_triton_model_config(tmp_path, checkpoint_dir, target, tp, replicas, mtp):
    repo = generate(tmp_path, target=target, tp=tp, replicas=replicas, checkpoint=checkpoint_dir,
                    num_speculative_tokens=mtp)
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        text = path.read_text()
        config = text_format.Parse(text, mc.ModelConfig())  # Triton's own message, unknown fields rejected
        assert text == HEADER + text_format.MessageToString(config)  # nothing lost
        configs[path.parent.name] = config
    serving = "tensorrt_llm" if target == "trtllm" else "nemo3"
    assert sorted(configs) == sorted(["ensemble", serving])
    model, ensemble = configs[serving], configs["ensemble"]
    assert model.backend == "python" and model.model_transaction_policy.decoupled and model.max_batch_size == 0
    assert [(g.kind, g.count) for g in model.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, replicas)]
    groups = ";".join(",".join(str(r * tp + i) for i in range(tp)) for r in range(replicas))
    params = {k: v.string_value for k, v in model.parameters.items()}
    assert params.get("gpu_device_ids") == (groups if target != "trtllm" or replicas > 1 else None)
    if target != "trtllm":
        assert params["tensor_parallel_size"] == str(tp) and params["build_dir"] == "../.."
        assert (repo / "nemo3" / "1" / "model.py").exists()
    ours = tensors(ensemble)
    assert {name: ours[name] for name in TRTLLM_ENSEMBLE if name in ours} == \
           {name: t for name, t in TRTLLM_ENSEMBLE.items() if name in ours}
    assert set(ours) >= set(TRTLLM_ENSEMBLE) - {"num_input_tokens", "num_output_tokens", "min_tokens"}
    # the LLM-API model reads no min_tokens: declared, it would be dropped silently (tensors.py)
    assert ("min_tokens" in ours) == (target != "trtllm") and "min_length" not in ours
    if target == "trtllm":
        assert tensors(model) == TRTLLM_LLMAPI
    else:
        assert tensors(model) == ours and {"think_budget", "num_speculative_tokens", "acceptance_length"} <= set(ours)
    report = validate_repository(repo, complete=False)
    assert report.errors == []
    assert report.notes == (["triton_repo/tensorrt_llm/1/model.py: not there yet; copy TensorRT-LLM's LLM-API "
                             "model.py and helpers.py into it (README.md)"] if target == "trtllm" else [])
    if target == "trtllm":  # as a server would load it: TensorRT-LLM's model code is missing
        version = repo / "tensorrt_llm" / "1"
        assert validate_repository(repo).errors == [
            f"triton_repo/tensorrt_llm/1: missing model.py and helpers.py (TensorRT-LLM's LLM-API Triton model, from "
            f"the container's TensorRT-LLM release); copy them: cp {LLMAPI_SOURCE}/model.py {LLMAPI_SOURCE}/helpers.py "
            f"{version}/"]


def test_llmapi_model_yaml_uses_tensorrt_llm_argument_names(tmp_path, checkpoint_dir):
    repo = generate(tmp_path, target="trtllm", tp=4, moe_parallel="ep", checkpoint=checkpoint_dir,
                    kv_cache_dtype="fp8", num_speculative_tokens=3)
    assert yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text()) == {
        "model": str(checkpoint_dir), "backend": "pytorch", "tensor_parallel_size": 4, "pipeline_parallel_size": 1,
        "moe_expert_parallel_size": 4, "moe_tensor_parallel_size": 1,
        "kv_cache_config": {"dtype": "fp8", "free_gpu_memory_fraction": 0.85, "mamba_ssm_cache_dtype": "float32",
                            "enable_block_reuse": False},
        "speculative_config": {"decoding_type": "MTP", "num_nextn_predict_layers": 3},
        "triton_config": {"max_batch_size": 0, "decoupled": True}}
    (tmp_path / "b").mkdir()
    plain = generate(tmp_path / "b", target="trtllm", tp=2, moe_parallel="tp", checkpoint=checkpoint_dir)
    args = yaml.safe_load((plain / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert "speculative_config" not in args
    assert (args["moe_expert_parallel_size"], args["moe_tensor_parallel_size"]) == (1, 2)


# (model, text in its generated config.pbtxt, replacement, the error the validator must give)
CONFIG_CORRUPTIONS = [
    ("nemo3", 'backend: "python"', 'backnd: "python"',
     r"^triton_repo/nemo3/config.pbtxt:\d+: backnd: .*has no field named"),
    ("nemo3", 'name: "top_k"\n  data_type: TYPE_INT32', 'name: "top_k"\n  data_type: TYPE_INT23',
     r"^triton_repo/nemo3/config.pbtxt:\d+: data_type: .*no value named TYPE_INT23"),
    ("nemo3", "kind: KIND_CPU", "kind: KIND_GPUS",
     r"^triton_repo/nemo3/config.pbtxt:\d+: kind: .*no value named KIND_GPUS"),
    ("nemo3", "optional: true", "optional: maybe", r"^triton_repo/nemo3/config.pbtxt:\d+: optional: "),
    ("ensemble", "model_version: -1", "model_version: ${model_version}",
     r"^triton_repo/ensemble/config.pbtxt:\d+: model_version: unfilled placeholder \$\{model_version\}$"),
    ("nemo3", 'string_value: "../.."', 'string_value: "${build_dir}"',
     r"^triton_repo/nemo3/config.pbtxt:\d+: parameters\[build_dir\]: unfilled placeholder \$\{build_dir\}$"),
    ("nemo3", 'string_value: "../.."', 'string_value: "../missing"',
     r"^triton_repo/nemo3/config.pbtxt: parameters\[build_dir\]: '../missing' does not exist"),
    ("nemo3", 'string_value: "test_client:load_server"', 'string_value: "not a spec"',
     r"^triton_repo/nemo3/config.pbtxt: parameters\[server_factory\]: server_factory 'not a spec': expected"),
    ("nemo3", 'name: "nemo3"', 'name: "nemo4"', r"^triton_repo/nemo3/config.pbtxt: name: 'nemo4' differs"),
    ("nemo3", 'name: "top_k"\n  data_type: TYPE_INT32', 'name: "top_k"\n  data_type: TYPE_INT64',
     r"^triton_repo/ensemble/config.pbtxt: ensemble_scheduling.step\[0\].input_map\[top_k\]: ensemble input "
     r"'top_k' is TYPE_INT32 but nemo3 input 'top_k' is TYPE_INT64$"),
    ("nemo3", 'name: "text_output"\n  data_type: TYPE_STRING\n  dims: -1',
     'name: "text_output"\n  data_type: TYPE_STRING\n  dims: 1\n  dims: -1',
     r"^triton_repo/ensemble/config.pbtxt: ensemble_scheduling.step\[0\].output_map\[text_output\]: .* nemo3 output "
     r"'text_output' has dims \[1, -1\] but ensemble output 'text_output' has \[-1\]$|^triton_repo/ensemble/config"
     r".pbtxt: output 'text_output': nemo3 output 'text_output' has dims \[1, -1\] but ensemble output"),
    ("ensemble", 'key: "finish_reason"\n      value: "finish_reason"', 'key: "finish"\n      value: "finish_reason"',
     r"^triton_repo/ensemble/config.pbtxt: ensemble_scheduling.step\[0\].output_map\[finish\]: 'nemo3' has no "
     r"output 'finish'"),
    ("ensemble", 'key: "text_input"\n      value: "text_input"', 'key: "text_inpt"\n      value: "text_input"',
     r"^triton_repo/ensemble/config.pbtxt: ensemble_scheduling.step\[0\].input_map\[text_inpt\]: 'nemo3' has no "
     r"input 'text_inpt'"),
    ("ensemble", 'model_name: "nemo3"', 'model_name: "nemo5"',
     r"^triton_repo/ensemble/config.pbtxt: ensemble_scheduling.step\[0\].model_name: 'nemo5' is not a model"),
]


@pytest.mark.parametrize("model,old,new,error", CONFIG_CORRUPTIONS)
def test_validator_names_the_corrupted_field(tmp_path, model, old, new, error):
    repo = generate(tmp_path, device="cpu", server_factory="test_client:load_server")
    assert check_repository(repo).ok
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    report = validate_repository(repo)
    assert report.errors, "the corruption went unnoticed"
    assert any(re.search(error, e) for e in report.errors), report.errors
    with pytest.raises(RepositoryError):
        check_repository(repo)


YAML_CORRUPTIONS = [
    ("backend: pytorch\n", "", r"model.yaml: backend: required key is missing"),
    ("mamba_ssm_cache_dtype: float32", "mamba_ssm_cache_dtype: fp8",
     r"model.yaml: kv_cache_config.mamba_ssm_cache_dtype: 'fp8': expected one of auto, float16, bfloat16, float32"),
    ("free_gpu_memory_fraction: 0.85", "free_gpu_memory_fraction: 1.5",
     r"model.yaml: kv_cache_config.free_gpu_memory_fraction: 1.5 is not in \(0, 1\]"),
    ("  decoupled: true", "  decoupled: false",
     r"model.yaml: triton_config.decoupled: False but config.pbtxt says True"),
    ("moe_expert_parallel_size: 2", "moe_expert_parallel_size: 3",
     r"model.yaml: moe_expert_parallel_size: 3 x moe_tensor_parallel_size 1 != tensor_parallel_size 2"),
    ("decoding_type: MTP", "decoding_type: MTQ", r"model.yaml: speculative_config.decoding_type: expected one of MTP"),
    ("model: /", "model: /nonexistent/", r"model.yaml: model: /nonexistent/.*: no checkpoint there"),
    ("max_batch_size: 0\n  decoupled", "max_batch_size: ${max_batch_size}\n  decoupled",
     r"model.yaml:\d+: max_batch_size: unfilled placeholder \$\{max_batch_size\}"),
]


@pytest.mark.parametrize("old,new,error", YAML_CORRUPTIONS)
def test_validator_checks_model_yaml(tmp_path, checkpoint_dir, old, new, error):
    repo = generate(tmp_path, target="trtllm", tp=2, checkpoint=checkpoint_dir, num_speculative_tokens=1)
    path = repo / "tensorrt_llm" / "1" / "model.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    errors = validate_repository(repo).errors
    assert any(re.search("^triton_repo/tensorrt_llm/1/" + error, e) for e in errors), errors


def test_gpu_groups_must_match_instances_and_tensor_parallel_size(tmp_path):
    repo = generate(tmp_path, tp=2, replicas=2)
    path = repo / "nemo3" / "config.pbtxt"
    path.write_text(path.read_text().replace('string_value: "0,1;2,3"', 'string_value: "0,1,2;3"'))
    assert validate_repository(repo).errors == [
        "triton_repo/nemo3/config.pbtxt: parameters[gpu_device_ids]: every group needs tensor_parallel_size=2 GPUs: "
        "'0,1,2;3'"]
    path.write_text(path.read_text().replace('string_value: "0,1,2;3"', 'string_value: "0,1"'))
    assert validate_repository(repo).errors == [
        "triton_repo/nemo3/config.pbtxt: parameters[gpu_device_ids]: 1 GPU groups for 2 model instances"]


def test_validate_repo_command(tmp_path):
    repo = generate(tmp_path)
    ok = CliRunner().invoke(cli, ["validate-repo", str(repo)])
    assert ok.exit_code == 0 and ok.stdout == f"{repo}: ok (ensemble, nemo3)\n"
    (repo / "nemo3" / "1" / "model.py").unlink()
    bad = CliRunner().invoke(cli, ["validate-repo", str(repo)])
    assert bad.exit_code == 1
    assert "error: triton_repo/nemo3/1: no model.py for the python backend" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (f"Error: {repo}: 1 problem(s); the first: triton_repo/nemo3/1: "
                                                   "no model.py for the python backend")


def test_validate_repo_command_needs_tensorrt_llms_model_code(tmp_path, checkpoint_dir):
    repo = generate(tmp_path, target="trtllm", checkpoint=checkpoint_dir)
    version = repo / "tensorrt_llm" / "1"
    bad = CliRunner().invoke(cli, ["validate-repo", str(repo)])
    assert bad.exit_code == 1
    assert (f"error: triton_repo/tensorrt_llm/1: missing model.py and helpers.py (TensorRT-LLM's LLM-API Triton "
            f"model, from the container's TensorRT-LLM release); copy them: cp {LLMAPI_SOURCE}/model.py "
            f"{LLMAPI_SOURCE}/helpers.py {version}/") in bad.stderr
    (version / "model.py").write_text("# TensorRT-LLM's\n")
    bad = CliRunner().invoke(cli, ["validate-repo", str(repo)])
    assert bad.exit_code == 1 and "missing helpers.py" in bad.stderr and f"cp {LLMAPI_SOURCE}/helpers.py {version}/" \
        in bad.stderr
    (version / "helpers.py").write_text("# TensorRT-LLM's\n")
    ok = CliRunner().invoke(cli, ["validate-repo", str(repo)])
    assert ok.exit_code == 0 and ok.stdout == f"{repo}: ok (ensemble, tensorrt_llm)\n"


def test_stage_writes_a_valid_repository_and_skips_when_unchanged(tmp_path):
    out = tmp_path / "out"
    options = BuildOptions(output=out, target="torch", tp=2)
    record = run_stages(options, ["triton_repo"], log=lambda _: None)
    stage = record["stages"]["triton_repo"]
    assert (stage["target"], stage["models"], stage["tp"], stage["notes"]) == ("torch", ["ensemble", "nemo3"], 2, [])
    repo = out / "triton_repo"
    assert check_repository(repo).ok and not (out / ".tmp-triton_repo").exists()
    assert (repo / "nemo3" / "1" / "model.py").read_bytes() == (Path(generate_module.__file__).with_name("model.py")
                                                                .read_bytes())
    readme = (repo / "README.md").read_text()
    assert f"tritonserver --model-repository={repo.resolve()} --grpc-port=8001" in readme
    assert f"nemo3 serve {repo.resolve()} --port 8001" in readme
    assert "tensor parallel size 2 (instance 0: GPUs 0,1)" in readme
    assert "runs 2 ranks: its own process is rank 0" in readme and "NCCL, one GPU per rank" in readme
    logs = []
    run_stages(options, ["triton_repo"], log=logs.append)
    assert logs == ["[triton_repo] up to date, skipped"]


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    return save_hf_checkpoint(hf_model(make_config("mtp")), tmp_path_factory.mktemp("mtp") / "ckpt")


def test_trtllm_stage_points_at_the_quantized_checkpoint(tmp_path, mtp_checkpoint):
    out = tmp_path / "out"
    options = BuildOptions(output=out, checkpoint=mtp_checkpoint, target="trtllm", tp=2, moe_parallel="ep")
    with pytest.raises(RepositoryError, match=r"^triton_repo/tensorrt_llm/1/model.yaml: model: .*/out/checkpoint: "
                                              r"no checkpoint there \(config.json missing\)$"):
        run_stages(options, ["triton_repo"], log=lambda _: None)
    assert not (out / "triton_repo").exists()
    (out / "checkpoint").mkdir()  # what the quantized-export stage writes
    (out / "checkpoint" / "config.json").write_text((mtp_checkpoint / "config.json").read_text())
    (out / "checkpoint" / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8"}}))
    record = run_stages(options, ["triton_repo"], log=lambda _: None)
    assert record["stages"]["triton_repo"]["models"] == ["ensemble", "tensorrt_llm"]
    args = yaml.safe_load((out / "triton_repo" / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert args["model"] == str((out / "checkpoint").resolve())
    assert args["kv_cache_config"]["dtype"] == "fp8" and args["kv_cache_config"]["mamba_ssm_cache_dtype"] == "float32"
    assert args["speculative_config"] == {"decoding_type": "MTP", "num_nextn_predict_layers": 3}
