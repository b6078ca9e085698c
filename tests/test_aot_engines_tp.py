"""Ahead-of-time engines of a --tp 2 build (aot_build.py's per-rank packages, run by the AOT executor on every rank
of the serving stack, gloo on the CPU) against tp 1 eager: the built-in model's bf16 build with the decode and the
greedy and sampling MTP k=2 speculative packages (no prefill chunk: each shape costs a compile per rank; a tp 2
prefill-chunk package was checked by hand to give tp 1 eager's logits), compiled once for the module (three packages
per rank, about a minute each on an idle 2-core machine), served by default as a tp 1 build's engines are."""

from __future__ import annotations

import inspect

import pytest
import torch

from nemo3.engines.executors import compiled_step
from nemo3.engines.executors.aot_executor import AOTExecutor
from nemo3.engines.executors.aot_manifest import Manifest
from nemo3.engines.executors.base import RaggedBatch
from nemo3.engines.executors.compiled_step import cpp_compiler
from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.engines.runtime.factory import StackOptions, open_scheduler
from nemo3.engines.runtime.requests import GenerationParams
from nemo3.export.build_folder import model_folder
from nemo3.pipeline import BuildOptions, run_stages

pytestmark = [pytest.mark.skipif(cpp_compiler() is None, reason="AOTInductor needs a C++ compiler on CPU; none found"),
              pytest.mark.timeout(1800)]
ROWS, LENGTH = 3, 128


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot_tp") / "tp2"
    options = BuildOptions(output=out, precision="bf16", tp=2, moe_parallel="tp", engines=True, engine_device="cpu",
                           engine_max_sequences=ROWS, engine_max_length=LENGTH, engine_sampling=True, engine_mtp=2,
                           engine_prefill_tokens=())
    record = run_stages(options, ["quantize", "shard", "engines"], log=lambda _: None)
    assert record["stages"]["engines"]["engines"] == 6, record["stages"]["engines"]
    return out


@pytest.fixture(scope="module")
def stack(build):
    """The build's serving stack: rank 0 here, rank 1 a worker, each running its own packages."""
    scheduler = open_scheduler(build, StackOptions(max_sequences=ROWS, max_length=LENGTH, num_speculative_tokens=0))
    yield scheduler
    scheduler.executor.close()


def test_the_ranks_packages_and_their_process_group_are_in_the_manifest(build):
    manifest = Manifest.read(build / "engines")
    assert (manifest.tp, manifest.group) == (2, "0")
    assert sorted((e.rank, e.file) for e in manifest.engines) == [
        (r, f"rank{r}/{step}.pt2") for r in (0, 1)
        for step in ("backbone_step_t1", "speculative_step_t3", "speculative_step_t3_sampling")]
    sampling = [(e.rank, e.sampling) for e in manifest.engines if e.file.endswith("_sampling.pt2")]
    assert sampling == [(0, True), (1, True)]


def test_tp2_engine_decode_gives_the_logits_of_tp1_eager(build, stack):
    """A prefill (eager on both ranks: no prefill package) then a decode step through each rank's package give tp 1
    eager's logits to fp32 rounding."""
    executor = stack.executor
    assert executor.kind == "aot" and executor.local.model.parallel.world_size == 2
    calls = []
    runners = executor.compiled.runners
    executor.compiled.runners = {key: Counted(runner, calls) for key, runner in runners.items()}
    try:
        eager = TorchExecutor(load(model_folder(build)), ROWS, LENGTH)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, eager.spec.vocab_size, (n,), generator=g).tolist() for n in (7, 11)]
        batches = [RaggedBatch.build([(p, 0, s) for p, s in zip(prompts, [2, 0])], [6, 17]),
                   RaggedBatch.build([([5], 7, 2), ([9], 11, 0)], [0, 1])]
        for batch in batches:
            want, got = eager.forward(batch).logits, executor.forward(batch).logits
            assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
        assert calls == [1]  # the decode step ran rank 0's package
    finally:
        executor.compiled.runners = runners


def test_tp2_engines_generate_the_greedy_text_of_tp1_eager(build, stack):
    """Generations of eager prefills and package decode steps, one after another on every rank (a rank whose gloo
    thread still held a Python tensor of an eager collective when a package started waited for the GIL the package
    held: a deadlock, settle() in engines/network/parallel.py)."""
    calls = []
    runners = stack.executor.compiled.runners
    stack.executor.compiled.runners = {key: Counted(runner, calls) for key, runner in runners.items()}
    prompts, params = ["The history of", "Once upon a time, a"], GenerationParams(max_tokens=12, ignore_eos=True)
    try:
        runs = [stack.generate(prompts, params) for _ in range(3)]
    finally:
        stack.executor.compiled.runners = runners
    eager = open_scheduler(model_folder(build), StackOptions(max_sequences=ROWS, max_length=LENGTH,
                                                             num_speculative_tokens=0))
    want = [c.token_ids for c in eager.generate(prompts, params)]
    assert [[c.token_ids for c in run] for run in runs] == [want] * 3, errors(*runs)
    assert len(calls) >= 3 * (params.max_tokens - 1)  # the decode steps ran rank 0's package


def test_tp2_engines_generate_the_greedy_text_of_tp1_eager_with_mtp_drafts(build, stack):
    """Greedy MTP k=2 through every rank's speculative package (verify + drafts, its collectives among eager ones)
    keeps tp 1 eager's text."""
    calls = []
    runners = stack.executor.compiled.runners
    stack.executor.compiled.runners = {key: Counted(runner, calls, key[0]) for key, runner in runners.items()}
    prompts = ["The history of", "Once upon a time, a"]
    try:
        got = stack.generate(prompts, GenerationParams(max_tokens=12, ignore_eos=True, num_speculative_tokens=2))
    finally:
        stack.executor.compiled.runners = runners
    eager = open_scheduler(model_folder(build), StackOptions(max_sequences=ROWS, max_length=LENGTH,
                                                             num_speculative_tokens=0))
    want = [c.token_ids for c in eager.generate(prompts, GenerationParams(max_tokens=12, ignore_eos=True))]
    assert [c.token_ids for c in got] == want, errors(got)
    assert "speculative_step" in calls  # rank 0's speculative package ran


def test_tp2_engines_sample_the_tokens_of_tp1_eager_with_mtp_drafts(build, stack):
    """Seeded sampled MTP k=2 through every rank's sampling speculative package (uniforms and sampling parameters
    broadcast by the leader, each rank accepting and drafting from the all-gathered logits) draws tp 1 eager's
    tokens: a rank that drew other tokens would keep another state, and the next all-gathered logits would differ."""
    calls = []
    runners = stack.executor.compiled.runners
    stack.executor.compiled.runners = {key: Counted(runner, calls, key) for key, runner in runners.items()}
    prompts = ["The history of", "Once upon a time, a"]
    params = [GenerationParams(max_tokens=12, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.95, seed=s,
                               num_speculative_tokens=2) for s in (11, 12)]
    try:
        got = stack.generate(prompts, params)
    finally:
        stack.executor.compiled.runners = runners
    eager = open_scheduler(model_folder(build), StackOptions(max_sequences=ROWS, max_length=LENGTH,
                                                             num_speculative_tokens=0))
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(prompts, params)], errors(got)
    uniforms = list(inspect.signature(compiled_step.speculative_step).parameters)[1:].index("uniforms")
    sampling = [key for key in calls if key[0] == "speculative_step" and key[2][uniforms]]  # (uniforms given)
    assert len(sampling) >= 3, calls  # rank 0's sampling speculative package ran


def errors(*runs) -> list:
    """The errors that ended the runs' generations early (a rank's failure, in one line), for a failed comparison."""
    return [c.stats.get("error") for run in runs for c in run if c.stats.get("error")]


class Counted:
    def __init__(self, runner, calls: list, mark=1):
        self.runner, self.calls, self.mark = runner, calls, mark

    def boxed_run(self, inputs):
        self.calls.append(self.mark)
        return self.runner.boxed_run(inputs)


def test_engines_of_another_tp_are_refused_in_one_line(build):
    with pytest.raises(ValueError) as error:
        AOTExecutor(load(model_folder(build)), build / "engines")
    message = str(error.value)
    assert "\n" not in message and "engines built for --tp 2 (process group '0'), this rank runs --tp 1" in message
