"""Serving tensor-parallel builds of the built-in model (gloo ranks on the CPU): quantized rank weights give the
logits of tp 1, the serving stack (leader + worker ranks) streams the greedy text of tp 1 with and without MTP,
directly and through the KServe server, and failures (a worker killed or hung, shutdown, cancellations) leave
no process and no slot behind.

The builds are module-scoped (one quantize per precision, a small calibration); tp 4 only for bf16's two MoE
splits.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import interruptible, wait_interrupted
from test_distributed import checks
from test_network import rel_err

from nemo3.engines.network.loading import load, load_rank
from nemo3.engines.network.parallel import Parallel
from nemo3.engines.runtime.factory import StackOptions, load_server, open_scheduler
from nemo3.engines.runtime.launcher import launch
from nemo3.engines.runtime.requests import FinishReason, GenerationParams
from nemo3.export.builtin import BUILTIN_DIR
from nemo3.export.kv_pages import pages_for
from nemo3.export.planner import sequence_state
from nemo3.export.rank_writer import write_ranks
from nemo3.export.spec import ModelSpec
from nemo3.pipeline import BuildOptions, run_stages
from nemo3.quant import nvfp4

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").exists(),
                                reason="the built-in model has not been trained into export/builtin/ yet")

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]
GREEDY = GenerationParams(max_tokens=12)
SERVE = {"max_sequences": 4, "max_length": 256}  # small state pools: the tests start many stacks


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """name -> build folder: "{precision}-tp{N}[-{moe}]", built lazily, each once per module."""
    made = {}

    def get(name: str):
        if name not in made:
            precision, tp, *moe = name.split("-")
            out = tmp_path_factory.mktemp(name)
            run_stages(BuildOptions(output=out, precision=precision, tp=int(tp[2:]), moe_parallel=(moe or ["ep"])[0],
                                    calib_samples=8, calib_seq_len=64), ["read", "quantize", "shard"],
                       log=lambda _: None)
            made[name] = out
        return made[name]

    return get


def no_process_left() -> bool:
    return not multiprocessing.active_children()


# ---- quantized rank weights ----------------------------------------------------------------------------------
def rank_checks(ranks: dict[str, str], out_file: str) -> None:
    """On every rank: the checks of test_distributed.py for the rank's quantized weights, both MoE splits."""
    results = {}
    for moe, folder in ranks.items():
        model = load_rank(folder, Parallel.from_process_group(moe), "cpu", torch.float32)
        results.update({f"{moe}.{key}": value for key, value in checks(model).items()})
    if model.parallel.rank == 0:
        save_file(results, out_file)


def with_nvfp4_lm_head(checkpoint, folder):
    """A copy of a quantized checkpoint whose lm_head is NVFP4 too (no recipe quantizes it)."""
    shutil.copytree(checkpoint, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    path = folder / index["weight_map"]["lm_head.weight"]
    tensors = load_file(path)
    q = nvfp4.quantize(tensors["lm_head.weight"].float())
    tensors.update({"lm_head.weight": q.packed, "lm_head.weight_scale": q.block_scale,
                    "lm_head.weight_scale_2": q.global_scale})
    save_file(tensors, path, metadata={"format": "pt"})
    index["weight_map"].update({f"lm_head.{s}": path.name for s in ("weight_scale", "weight_scale_2")})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("case", ["nvfp4", "fp8", "nvfp4-lm_head"])
def test_quantized_ranks_give_the_logits_of_tp1(builds, case, tmp_path):
    checkpoint = builds(f"{case.split('-')[0]}-tp2") / "checkpoint"
    if case == "nvfp4-lm_head":
        checkpoint = with_nvfp4_lm_head(checkpoint, tmp_path / "checkpoint")
    want = checks(load(checkpoint))
    ranks = {moe: str(tmp_path / f"ranks_{moe}") for moe in ("ep", "tp")}
    for moe, folder in ranks.items():
        write_ranks(checkpoint, folder, 2, moe)
    launch(rank_checks, 2, "gloo", args=(ranks, str(tmp_path / "rank0.safetensors")))
    got = load_file(tmp_path / "rank0.safetensors")
    errors = {f"{moe}.{key}": rel_err(got[f"{moe}.{key}"], value) for moe in ranks for key, value in want.items()}
    assert max(errors.values()) <= 1e-4, errors


# ---- the serving stack ------------------------------------------------------------------------------------------
def tp1_texts(build, k: int) -> list[str]:
    scheduler = open_scheduler(build / "checkpoint", StackOptions(num_speculative_tokens=k, **SERVE))
    return [c.text for c in scheduler.generate(PROMPTS, GREEDY)]


def concurrent_texts(server, k: int) -> list[str]:
    """Every prompt streamed on its own thread at once (they batch together)."""
    params = GenerationParams(max_tokens=GREEDY.max_tokens, num_speculative_tokens=k)
    texts = {}

    def run(i):
        texts[i] = "".join(d.text for d in server.stream(PROMPTS[i], params, f"k{k}-{i}"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [texts.get(i) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("name", ["bf16-tp2", "nvfp4-tp2", "bf16-tp4-ep", "bf16-tp4-tp"])
def test_served_text_equals_tp1(builds, name):
    build, tp = builds(name), int(name.split("-")[1][2:])
    server = load_server(build, "cpu", tp, **SERVE)
    try:
        for k in (0, 2):
            assert concurrent_texts(server, k) == tp1_texts(build, k), k
        assert server.engine.slots.in_use == 0
    finally:
        server.close()
    assert no_process_left()


def test_state_memory_sizes_every_rank_by_the_planners_per_rank_accounting(builds):
    """StackOptions.state_memory at tp 2 is bytes per rank: leader and worker build the slots and pages the
    planner's per-rank state gives (tests/test_kv_pages.py checks each rank's pools against it), every page is
    mapped on both ranks, and the text is tp 1's."""
    build, context = builds("bf16-tp2"), SERVE["max_length"]
    state = sequence_state(ModelSpec.from_config(json.loads((build / "checkpoint" / "config.json").read_text())), 2, "fp32",
                           conv_bytes=4)  # float32 on CPU
    scheduler = open_scheduler(build, StackOptions(max_length=context, state_memory=2 * state.bytes(context) + 1))
    try:
        executor = scheduler.executor
        assert (executor.max_sequences, executor.num_pages) == (2, 2 * pages_for(context))
        assert executor.local.state.nbytes() == 2 * state.bytes(context)
        texts = [c.text for c in scheduler.generate(PROMPTS, GREEDY)]
    finally:
        scheduler.executor.close()
    assert texts == tp1_texts(build, 0)
    assert no_process_left()


def test_generate_serves_a_tp_build(builds):
    from click.testing import CliRunner

    from nemo3.cli.main import main

    build = builds("nvfp4-tp2")
    result = CliRunner().invoke(main, ["generate", "--build", str(build), PROMPTS[0], "--max-tokens", "12",
                                       "--mtp", "2"])
    assert result.exit_code == 0, result.output
    assert result.output == PROMPTS[0] + tp1_texts(build, 2)[0] + "\n"
    assert no_process_left()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_stopping_generate_leaves_no_process(builds, sig):
    """Ctrl-C on `nemo3 generate` (SIGINT to the leader alone: its workers stop when it closes their pipes), or
    the leader killed outright (the workers' pipes close with it): its process group empties."""
    import subprocess
    import sys

    nemo3 = [sys.executable, "-c", "from nemo3.cli.main import main; main()"]
    run = subprocess.Popen(nemo3 + ["generate", "--build", str(builds("bf16-tp2")), PROMPTS[0], "--max-tokens", "1000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                           preexec_fn=interruptible)
    assert run.stdout.read(len(PROMPTS[0]) + 1)  # serving: the prompt and a first token are out
    os.kill(run.pid, sig)
    wait_interrupted(run)
    assert run.returncode == (1 if sig == signal.SIGINT else -sig)  # (click: "Aborted!")
    for _ in range(100):  # the workers see their pipe close and exit
        try:
            os.killpg(run.pid, 0)
        except ProcessLookupError:
            break
        threading.Event().wait(0.1)
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pid, 0)


def test_kserve_server_streams_the_text_of_tp1(builds, tmp_path):
    """tritonclient -> `nemo3 serve`'s KServe server -> the generated ensemble -> model.py -> load_server(tp=2); a
    worker killed afterwards makes the model not ready."""
    from tritonclient.grpc import InferenceServerClient

    from nemo3.triton_repo.client import ModelNotReady, RequestOptions, TextClient
    from nemo3.triton_repo.dev_server import DevServer
    from nemo3.triton_repo.generate import RepositoryOptions, write_repository

    build = builds("bf16-tp2")
    write_repository(tmp_path / "repo", RepositoryOptions(device="cpu", tp=2, build_dir=str(build)))
    with DevServer(tmp_path / "repo") as server:
        client = TextClient(server.url)
        for k in (0, 2):
            got = [r.text for r in client.generate_many(PROMPTS, RequestOptions(max_tokens=GREEDY.max_tokens,
                                                                                 num_speculative_tokens=k))]
            assert got == tp1_texts(build, k), k
        health = InferenceServerClient(server.url)
        assert health.is_model_ready("ensemble")
        os.kill(worker_pid(server.models["nemo3"].instance.engine), signal.SIGKILL)
        for _ in range(100):  # the worker exits and is reaped
            if not health.is_model_ready("ensemble"):
                break
            threading.Event().wait(0.05)
        assert not health.is_model_ready("nemo3") and not health.is_model_ready("ensemble")
        with pytest.raises(ModelNotReady):
            TextClient(server.url).generate_many(PROMPTS[:1], RequestOptions(max_tokens=4))
    assert no_process_left()


# ---- failures ---------------------------------------------------------------------------------------------------
def worker_pid(server) -> int:
    return server.engine.executor.workers.processes[0].pid


def test_serving_needs_the_tp_of_the_build(builds):
    build = builds("bf16-tp2")
    with pytest.raises(ValueError, match=rf"^tensor_parallel_size=1: {build} was built for --tp 2$"):
        load_server(build, "cpu", 1)
    assert no_process_left()


def test_a_worker_that_cannot_load_is_a_one_line_error(builds, tmp_path):
    broken = tmp_path / "build"
    shutil.copytree(builds("bf16-tp2"), broken)
    (broken / "ranks" / "rank1" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(RuntimeError, match=r"^rank 1 of 2 exited \(CheckpointError: .*rank1/model.safetensors: "
                                           r"truncated or corrupt safetensors file"):
        load_server(broken, "cpu", 2, **SERVE)
    assert no_process_left()


def test_a_killed_worker_fails_the_streams_and_leaves_no_process(builds):
    server = load_server(builds("bf16-tp2"), "cpu", 2, **SERVE)
    long = GenerationParams(max_tokens=200, ignore_eos=True)
    streams = [server.stream(p, long, f"r{i}") for i, p in enumerate(PROMPTS)]
    assert not next(streams[0]).finished
    os.kill(worker_pid(server), signal.SIGKILL)
    died = "RankFailure: rank 1 of 2 exited (exit code -9)"
    for stream in streams:
        last = list(stream)[-1]
        assert (last.finish_reason, last.stats["error"]) == (FinishReason.ERROR, died)
    assert not server.ready()
    last = list(server.stream(PROMPTS[0], GREEDY, "after"))[-1]  # a later request fails at its first step
    assert (last.finish_reason, last.stats["error"]) == (FinishReason.ERROR, died)
    server.close()
    assert no_process_left()


def test_a_hung_worker_is_detected_by_the_timeout(builds):
    server = load_server(builds("bf16-tp2"), "cpu", 2, rank_timeout_s=3, **SERVE)
    stream = server.stream(PROMPTS[0], GenerationParams(max_tokens=200, ignore_eos=True), "hung")
    next(stream)
    os.kill(worker_pid(server), signal.SIGSTOP)
    last = list(stream)[-1]
    assert last.finish_reason is FinishReason.ERROR
    assert re.match(r"RankFailure: .*[Tt]imed out", last.stats["error"]), last.stats["error"]
    assert not server.ready()
    server.close()  # kills the stopped worker
    assert no_process_left()


def test_hundred_requests_with_cancellations_leak_nothing(builds):
    server = load_server(builds("bf16-tp2"), "cpu", 2, **SERVE)
    params = GenerationParams(max_tokens=8, ignore_eos=True)
    reasons = {}

    def client(first: int):
        for i in range(first, 100, 4):
            stream = server.stream([5 + i % 7, 9, 17], params, f"q{i}")
            delta = next(stream)
            if i % 3 == 0 and not delta.finished:
                server.cancel(f"q{i}")
            elif i % 5 == 0 and not delta.finished:
                stream.close()  # the client went away
                reasons[i] = FinishReason.CANCELLED
                continue
            last = delta if delta.finished else list(stream)[-1]
            reasons[i] = last.finish_reason

    threads = [threading.Thread(target=client, args=(first,)) for first in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reasons) == 100
    assert FinishReason.CANCELLED in reasons.values() and FinishReason.LENGTH in reasons.values()
    for _ in range(100):  # an abandoned stream's cancellation reaches the engine thread asynchronously
        if server.engine.slots.in_use == 0:
            break
        threading.Event().wait(0.02)
    assert server.engine.slots.in_use == 0
    assert server.ready()
    server.close()
    assert no_process_left()
