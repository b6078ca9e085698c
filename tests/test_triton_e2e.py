"""End to end with the real runtime: tritonclient -> KServe v2 gRPC development server -> the generated ensemble ->
model.py -> nemo3.engines.runtime.factory:load_server -> the runtime. The streamed text must equal the runtime's
own output for the same greedy request."""

from __future__ import annotations

import pytest
from conftest import add_missing_tensors, copy_builtin_tokenizer, hf_model, make_config, save_hf_checkpoint

from nemo3.engines.runtime.requests import GenerationParams
from nemo3.engines.runtime.factory import open_scheduler
from nemo3.export.builtin import BUILTIN_DIR
from nemo3.triton_repo.client import RequestOptions, TextClient
from nemo3.triton_repo.generate import RepositoryOptions, write_repository
from nemo3.triton_repo.dev_server import DevServer

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random MTP model with the built-in tokenizer (its vocabulary size), as a serving build would hold."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(BUILTIN_DIR / "tokenizer.json")).get_vocab_size()
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=vocab)), tmp_path_factory.mktemp("e2e"))
    add_missing_tensors(folder)
    copy_builtin_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository(repo, RepositoryOptions(device="cpu", build_dir=str(checkpoint)))
    with DevServer(repo) as srv:
        yield srv


def test_streamed_text_equals_the_runtime(checkpoint, server):
    want = open_scheduler(checkpoint).generate(PROMPTS, GenerationParams(max_tokens=16))
    client = TextClient(server.url)
    for prompt, expected in zip(PROMPTS, want):
        chunks = list(client.stream(prompt, RequestOptions(max_tokens=16, num_speculative_tokens=2)))
        assert "".join(c.text for c in chunks) == expected.text
        assert chunks[-1].num_output_tokens == len(expected.token_ids)
    results = client.generate_many(PROMPTS * 3, RequestOptions(max_tokens=16), concurrency=9)
    assert [r.text for r in results] == [w.text for w in want] * 3


def test_bench_through_the_server(server):
    from click.testing import CliRunner

    from nemo3.cli.main import main as cli

    result = CliRunner().invoke(cli, ["bench", "--server", server.url, "--model-name", "ensemble", "--num-prompts", "4",
                                      "--input-len", "16", "--output-len", "8", "--concurrency", "2", "-o",
                                      str(server.repository.parent / "bench")])
    assert result.exit_code == 0, result.output
    assert "| triton ensemble at" in result.output


def test_cuda_repository_on_a_machine_without_cuda_is_one_line(checkpoint, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # model.py sets it for its instance; restored afterwards
    write_repository(tmp_path / "repo", RepositoryOptions(device="cuda", build_dir=str(checkpoint)))
    with pytest.raises(Exception, match=r"/repo/nemo3: nemo3: device='cuda', but torch .* sees no CUDA device here") as info:
        DevServer(tmp_path / "repo").start()
    assert type(info.value.__cause__).__name__ == "TritonModelException" and "\n" not in str(info.value)
    assert 'config.pbtxt parameter device to "cpu"' in str(info.value)
