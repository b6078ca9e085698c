"""`nemo3 serve`, the KServe v2 development server, answers as Triton does where a client can tell:
an ensemble with a decoupled step is decoupled, ServerMetadata lists `statistics` and ModelStatistics
counts what was sent, unary ModelInfer answers non-decoupled models and refuses decoupled ones with
Triton's error. The nemo3 repository is served with test_client's engine (prompt words reversed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import interruptible, wait_interrupted
from tritonclient.utils import InferenceServerException

from nemo3.triton_repo.client import Generation, RequestFailed, RequestOptions, TextClient
from nemo3.triton_repo.dev_server import DevServer
from nemo3.triton_repo.generate import RepositoryOptions, write_repository
from nemo3.triton_repo.validate import parse_model_config

UPPER_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            upper = np.array([t.upper() for t in text], dtype=np.object_)
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("upper", upper)]))
        return answers
'''
UPPER_CONFIG = '''name: "upper" backend: "python" max_batch_size: 0
input { name: "text" data_type: TYPE_STRING dims: 1 }
output { name: "upper" data_type: TYPE_STRING dims: 1 }
'''
UPPER_ENSEMBLE = '''name: "ensemble" platform: "ensemble" max_batch_size: 0
input { name: "text_input" data_type: TYPE_STRING dims: 1 }
output { name: "text_output" data_type: TYPE_STRING dims: 1 }
ensemble_scheduling { step { model_name: "upper" model_version: -1
  input_map { key: "text" value: "text_input" } output_map { key: "upper" value: "text_output" } } }
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    (root / "build").mkdir()
    write_repository(root / "repo", RepositoryOptions(device="cpu", build_dir=str(root / "build"),
                                                      server_factory="test_client:load_server"))
    return root / "repo"


@pytest.fixture(scope="module")
def upper_repo(tmp_path_factory):
    """A repository without a decoupled model: one Python model and an ensemble over it."""
    root = tmp_path_factory.mktemp("upper")
    (root / "upper" / "1").mkdir(parents=True)
    (root / "upper" / "1" / "model.py").write_text(UPPER_MODEL)
    (root / "upper" / "config.pbtxt").write_text(UPPER_CONFIG)
    (root / "ensemble").mkdir()
    (root / "ensemble" / "config.pbtxt").write_text(UPPER_ENSEMBLE)
    return root


def text_input(name: str, value: str):
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return tensor


def counts(client, model: str) -> tuple[int, int, int, int]:
    """(successes, failures, inferences, executions) of one model."""
    (stats,) = client.get_inference_statistics(model).model_stats
    infer = stats.inference_stats
    assert infer.compute_input.count == infer.compute_infer.count == infer.compute_output.count == infer.success.count
    return infer.success.count, infer.fail.count, stats.inference_count, stats.execution_count


def test_an_ensemble_over_a_decoupled_step_is_decoupled(repo, upper_repo):
    assert not parse_model_config(repo / "ensemble" / "config.pbtxt").model_transaction_policy.decoupled
    with DevServer(repo) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert client.get_model_config("ensemble").config.model_transaction_policy.decoupled
        assert client.get_model_config("nemo3").config.model_transaction_policy.decoupled
    with DevServer(upper_repo) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert not client.get_model_config("ensemble").config.model_transaction_policy.decoupled


def test_statistics_count_the_requests_sent(repo):
    with DevServer(repo) as server, grpcclient.InferenceServerClient(server.url) as client:
        metadata = client.get_server_metadata()
        assert "statistics" in metadata.extensions and "not Triton" in metadata.name
        assert counts(client, "ensemble") == counts(client, "nemo3") == (0, 0, 0, 0)
        text = TextClient(server.url)
        for prompt in ("a b", "c d e", "f"):
            text.generate(prompt)
        TextClient(server.url, model="nemo3").generate("g h")
        with pytest.raises(RequestFailed, match="max_tokens=0"):  # fails in the model: a failure everywhere
            text.generate("x", RequestOptions(max_tokens=0))
        with pytest.raises(RequestFailed, match="unexpected inference input 'bogus'"):  # refused: counted nowhere
            list(Generation(server.url, "ensemble", [text_input("text_input", "y"), text_input("bogus", "z")], 5))
        assert counts(client, "ensemble") == (3, 1, 3, 3)
        assert counts(client, "nemo3") == (4, 1, 4, 4)
        assert [s.name for s in client.get_inference_statistics().model_stats] == ["ensemble", "nemo3"]
        with pytest.raises(InferenceServerException, match="requested model 'nope' is not available"):
            client.get_inference_statistics("nope")


def test_unary_infer_on_a_decoupled_model_is_refused_as_triton_does(repo):
    with DevServer(repo) as server, grpcclient.InferenceServerClient(server.url) as client:
        inputs = [text_input("text_input", "a b")]
        max_tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([4], dtype=np.int32))
        for model in ("ensemble", "nemo3"):
            with pytest.raises(InferenceServerException) as info:
                client.infer(model, inputs + [max_tokens])
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
            assert info.value.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"


def test_unary_infer_answers_a_non_decoupled_ensemble(upper_repo):
    with DevServer(upper_repo) as server, grpcclient.InferenceServerClient(server.url) as client:
        result = client.infer("ensemble", [text_input("text_input", "hello")])
        assert result.as_numpy("text_output").tolist() == [b"HELLO"]
        assert counts(client, "ensemble") == counts(client, "upper") == (1, 0, 1, 1)
        with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found"):
            client.infer("nope", [text_input("text_input", "x")])


def test_serve_command_serves_until_interrupted(repo):
    tests = str(Path(__file__).parent)  # the server factory test_client:load_server
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from nemo3.cli.main import main; main()", "serve", str(repo), "--port", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        line = process.stderr.readline()
        assert line.startswith("nemo3-dev-server (not Triton): ensemble, nemo3 at 127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        assert TextClient(url).generate("one two").text == "two one"
    finally:
        process.send_signal(signal.SIGINT)
        wait_interrupted(process)
        assert process.returncode == 0


def test_serve_command_names_a_model_that_cannot_load(tmp_path):
    from click.testing import CliRunner

    from nemo3.cli.main import main as cli

    (tmp_path / "empty").mkdir()
    write_repository(tmp_path / "repo", RepositoryOptions(device="cpu", build_dir=str(tmp_path / "empty")))
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "repo"), "--port", "0"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: {tmp_path / 'repo' / 'nemo3'}: nemo3: "), result.output
