"""Ahead-of-time engines (engines/executors/step_export.py, aot_build.py, aot_executor.py, the pipeline's `engines`
stage) against the eager executor: a bf16 build of the built-in model (fp32 activations on CPU) with the decode and
greedy speculative (k=2) and 16-token prefill chunk engines, and an nvfp4 build with the decode engine, each compiled
once for the module, for sequences of two 64-token pages (each package reads 1 or 2 pages per row: a dynamic
dimension)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import snapshot

from nemo3.engines.executors.aot_executor import AOTExecutor
from nemo3.engines.executors.aot_manifest import MANIFEST
from nemo3.engines.executors.base import RaggedBatch, SpeculativeBatch
from nemo3.engines.executors.compiled_step import cpp_compiler
from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.engines.runtime.factory import StackOptions, open_scheduler
from nemo3.engines.runtime.requests import GenerationParams
from nemo3.export.build_folder import model_folder
from nemo3.pipeline import BuildOptions, run_stages

# four packages (about 40 s each on an idle 2-core machine, longer under load)
pytestmark = [pytest.mark.skipif(cpp_compiler() is None, reason="AOTInductor needs a C++ compiler on CPU; none found"),
              pytest.mark.timeout(1800)]
ROWS, LENGTH = 3, 128
STAGES = ["quantize", "engines"]


def options(out, precision: str) -> BuildOptions:
    return BuildOptions(output=out, precision=precision, engines=True, engine_device="cpu", engine_max_sequences=ROWS,
                        engine_max_length=LENGTH, engine_sampling=False, engine_mtp=2 if precision == "bf16" else 0,
                        engine_prefill_tokens=(16,) if precision == "bf16" else (), calib_samples=4, calib_seq_len=32)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    for precision, packages in (("bf16", 3), ("nvfp4", 1)):
        record = run_stages(options(root / precision, precision), STAGES, log=lambda _: None)
        assert record["stages"]["engines"]["engines"] == packages
    return root


class Counted:
    """A package's runner that records the pages per row of each call (its int32 input: the sliced block table):
the engines really run, not the eager fallback."""

    def __init__(self, runner, calls: list):
        self.runner, self.calls = runner, calls

    def boxed_run(self, inputs):
        self.calls += [t.shape[1] for t in inputs if t.dtype == torch.int32]
        return self.runner.boxed_run(inputs)


def count_calls(executor) -> list[int]:
    """The pages per row of every package call `executor` makes from now on (Counted)."""
    calls = []
    executor.compiled.runners = {key: Counted(runner, calls) for key, runner in executor.compiled.runners.items()}
    return calls


@pytest.mark.parametrize("precision", ["bf16", "nvfp4"])
def test_engine_steps_equal_the_eager_executor(builds, precision):
    """A prefill (for bf16 the 11-token prompt as a 16-token chunk through its engine, the 7-token one eagerly), a
    decode step (T=1) and, for bf16, a greedy speculative step (rows with 2 and 1 drafts) through the engines give
    the eager executor's logits, accepted counts, tokens, drafts and state pools; the padding rows touch no slot."""
    model = load(model_folder(builds / precision))
    eager, aot = TorchExecutor(model, ROWS, LENGTH), AOTExecutor(model, builds / precision / "engines")
    assert aot.kind == "aot" and (aot.max_sequences, aot.max_length) == (ROWS, LENGTH)
    calls = count_calls(aot)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.spec.vocab_size, (n,), generator=g).tolist() for n in (7, 11)]
    slots = [2, 0]  # slot 1 stays free: nobody may write it
    row = torch.tensor
    steps = [lambda ex: ex.forward(RaggedBatch.build([(p, 0, s) for p, s in zip(prompts, slots)], [6, 17])).logits,
             lambda ex: ex.forward(RaggedBatch.build([([5], 7, 2), ([9], 11, 0)], [0, 1])).logits]
    if precision == "bf16":
        steps.append(lambda ex: ex.speculate(SpeculativeBatch(
            row([[5, 6, 7], [9, 1, 0]]), row([2, 1]), row([8, 12]), row([2, 0]), row([0.0] * 2), row([0] * 2),
            row([1.0] * 2), None)))
    for step in steps:
        want, got = step(eager), step(aot)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5) if torch.is_tensor(want) else got == want
        after_eager, after_aot = snapshot(eager), snapshot(aot)
        for name, t in after_eager.items():
            assert torch.allclose(after_aot[name].float(), t.float(), rtol=1e-4, atol=1e-5), name
    # bf16: the 11-token chunk, the decode and the speculative step; nvfp4: the decode step (its prompts run eagerly)
    assert calls == ([1] * 3 if precision == "bf16" else [1])
    for name, t in snapshot(aot).items():
        assert not t[1].any(), f"{name}: the free slot 1 was written"


@pytest.mark.parametrize("k", [0, 2])
def test_greedy_text_through_the_engines_equals_eager(builds, k):
    """The serving stack the factory picks for a build with engines generates, greedily, the eager stack's tokens,
    with MTP off and with 2 drafts; the longest prompt (about 55 tokens) grows past its first page, so the same
    packages read 1, then 2 pages per row."""
    prompts = ["The history of", "Once upon a time, a", ("In mathematics, a group is a set with an operation that is "
               "associative, has an identity element and has inverses: the integers with addition form a group, and "
               "so do the rotations of a square about its centre in the plane")]
    params = GenerationParams(max_tokens=16, ignore_eos=True)
    outputs = []
    for engines in (None, False):
        scheduler = open_scheduler(builds / "bf16", StackOptions(max_sequences=ROWS, max_length=LENGTH,
                                                                 engines=engines, num_speculative_tokens=k))
        assert scheduler.executor.kind == ("aot" if engines is None else "eager")
        calls = count_calls(scheduler.executor) if engines is None else None
        outputs.append([c.token_ids for c in scheduler.generate(prompts, params)])
        assert calls is None or set(calls) == {1, 2}
    assert [len(t) for t in outputs[0]] == [16] * 3
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("field, value", [("torch", "1.0.0"), ("arch", "sm_90"), ("device", "cuda")])
def test_engines_built_elsewhere_are_refused_in_one_line(builds, tmp_path, field, value):
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest = json.loads((builds / "bf16" / "engines" / MANIFEST).read_text())
    (engines / MANIFEST).write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(ValueError) as error:
        AOTExecutor(load(model_folder(builds / "bf16")), engines)
    message = str(error.value)
    assert "\n" not in message and value in message and "rebuild them here with `nemo3-build" in message


def test_rerunning_the_build_skips_the_engines_stage(builds, tmp_path):
    logs = []
    run_stages(options(builds / "bf16", "bf16"), STAGES, log=logs.append)
    assert "[engines] up to date, skipped" in logs
    copy = tmp_path / "copy"  # engines of another checkpoint: the factory refuses them
    shutil.copytree(builds / "bf16", copy)
    manifest = json.loads((copy / "engines" / MANIFEST).read_text())
    (copy / "engines" / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="engines built from another checkpoint"):
        open_scheduler(copy, StackOptions())


def test_a_build_without_engines_says_why_and_serves_as_before(tmp_path):
    """A build that did not ask for engines, or whose engines cannot be built yet (--tp 2), gets a manifest saying
    why and no packages; the factory then serves it without engines, and refuses when engines are required."""
    for out, opts in ((tmp_path / "plain", {}), (tmp_path / "tp2", {"tp": 2, "engines": True})):
        record = run_stages(BuildOptions(output=out, precision="bf16", engine_device="cpu", **opts), STAGES,
                            log=lambda _: None)
        assert record["stages"]["engines"]["engines"] == 0
    assert record["stages"]["engines"]["unsupported"].startswith("--tp 2: per-rank engines are not built yet")
    assert open_scheduler(tmp_path / "plain", StackOptions(compile=False)).executor.kind == "eager"
    with pytest.raises(ValueError, match="no engines .not asked for"):
        open_scheduler(tmp_path / "plain", StackOptions(engines=True))
