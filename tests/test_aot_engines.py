"""Ahead-of-time engines (engines/executors/aot_build.py, aot_executor.py, the pipeline's `engines` stage) against
the eager executor: one bf16 build of the built-in model, its engines compiled once for the module (fp32 on CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from nemo3.engines.executors.aot_executor import AOTExecutor
from nemo3.engines.executors.aot_manifest import MANIFEST
from nemo3.engines.executors.base import RaggedBatch
from nemo3.engines.executors.compiled_step import cpp_compiler
from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.engines.runtime.factory import StackOptions, open_scheduler
from nemo3.engines.runtime.requests import GenerationParams
from nemo3.export.build_folder import model_folder
from nemo3.pipeline import BuildOptions, run_stages

# the module's build compiles six packages (about 25 s each on an idle 2-core machine, several minutes under load)
pytestmark = [pytest.mark.skipif(cpp_compiler() is None, reason="AOTInductor needs a C++ compiler on CPU; none found"),
              pytest.mark.timeout(2400)]
ROWS, LENGTH = 3, 64
STAGES = ["quantize", "engines"]


def options(out) -> BuildOptions:
    return BuildOptions(output=out, precision="bf16", engine_device="cpu", engine_max_sequences=ROWS,
                        engine_max_length=LENGTH)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "out"
    logs = []
    record = run_stages(options(out), STAGES, log=logs.append)
    assert record["stages"]["engines"]["engines"] == 6, logs  # decode, decode + verify recording, MTP T=1..3
    return out


def snapshot(executor) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": t.clone() for key, entry in executor.state.layers.items()
            for name, t in vars(entry).items() if isinstance(t, torch.Tensor)}


def test_engine_steps_equal_the_eager_executor(build):
    """Decode (T=1), verify (T=3, recording the Mamba states, then commit_steps) and MTP calls (T=1, T=2) through the
    engines give the eager executor's hidden states, logits and state pools; prefill chunks run eagerly in both."""
    model = load(model_folder(build))
    eager, aot = TorchExecutor(model, ROWS, LENGTH), AOTExecutor(model, build / "engines")
    assert aot.kind == "aot" and (aot.max_sequences, aot.max_length) == (ROWS, LENGTH)
    ran = []  # the engines really run (not the eager fallback)
    for name in ("backbone", "mtp"):
        step = getattr(aot.compiled, name)
        setattr(aot.compiled, name, lambda *args, step=step, name=name: ran.append(name) or step(*args))
    g = torch.Generator().manual_seed(0)
    vocab = model.spec.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 11)]
    calls = [
        ("forward", RaggedBatch.build([(prompts[0], 0, 2), (prompts[1], 0, 0)], [6, 17])),  # prefill: slot 1 stays free
        ("forward", RaggedBatch.build([([5], 7, 2), ([9], 11, 0)], [0, 1])),
        ("forward", RaggedBatch.build([([5, 6, 7], 8, 2), ([9, 1, 2], 12, 0)], [0, 1, 2, 3, 4, 5], keep_steps=True)),
        ("mtp", RaggedBatch.build([([4], 3, 2), ([8], 9, 0)], [0, 1])),
        ("mtp", RaggedBatch.build([([4, 2], 4, 2), ([8, 3], 10, 0)], [1, 3])),
    ]
    for kind, batch in calls:
        outs = []
        for ex in (eager, aot):
            if kind == "forward":
                outs.append(ex.forward(batch))
                if batch.keep_steps:
                    ex.commit_steps([2, 0], [1, 2])
            else:
                hidden = torch.randn(len(batch.token_ids), model.spec.hidden_size,
                                     generator=torch.Generator().manual_seed(1))
                outs.append(ex.mtp_forward(batch, hidden))
        (want, got) = outs
        assert torch.allclose(got.hidden, want.hidden, rtol=1e-4, atol=1e-5), kind
        assert torch.allclose(got.logits, want.logits, rtol=1e-4, atol=1e-5), kind
        after_eager, after_aot = snapshot(eager), snapshot(aot)
        for name, t in after_eager.items():
            assert torch.allclose(after_aot[name], t, rtol=1e-4, atol=1e-5), (kind, name)
    assert ran == ["backbone", "backbone", "mtp", "mtp"]
    for name, t in snapshot(aot).items():
        assert not t[1].any(), f"{name}: the free slot 1 was written"


@pytest.mark.parametrize("k", [0, 2])
def test_greedy_text_through_the_engines_equals_eager(build, k):
    """The serving stack a build's engines are picked for (the factory's default) generates, greedily, the eager
    stack's tokens, with MTP speculation off and with 2 drafts."""
    prompts = ["The history of", "Once upon a time, a", "In mathematics, a group"]
    params = GenerationParams(max_tokens=16, ignore_eos=True)
    outputs = []
    for engines in (None, False):
        scheduler = open_scheduler(build, StackOptions(max_sequences=ROWS, max_length=LENGTH, engines=engines,
                                                       compile=False, num_speculative_tokens=k))
        assert scheduler.executor.kind == ("aot" if engines is None else "eager")
        outputs.append([c.token_ids for c in scheduler.generate(prompts, params)])
    assert [len(t) for t in outputs[0]] == [16] * 3
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("field, value", [("torch", "1.0.0"), ("arch", "sm_90"), ("device", "cuda")])
def test_engines_built_elsewhere_are_refused_in_one_line(build, tmp_path, field, value):
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest = json.loads((build / "engines" / MANIFEST).read_text())
    (engines / MANIFEST).write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(ValueError) as error:
        AOTExecutor(load(model_folder(build)), engines)
    message = str(error.value)
    assert "\n" not in message and value in message and "rebuild them here with `nemo3-build" in message


def test_rerunning_the_build_skips_the_engines_stage(build, tmp_path):
    logs = []
    run_stages(options(build), STAGES, log=logs.append)
    assert "[engines] up to date, skipped" in logs
    copy = tmp_path / "copy"  # an engine of another checkpoint: the factory refuses it
    shutil.copytree(build, copy)
    manifest = json.loads((copy / "engines" / MANIFEST).read_text())
    (copy / "engines" / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="engines built from another checkpoint"):
        open_scheduler(copy, StackOptions())


def test_a_build_without_engines_says_why_and_serves_as_before(tmp_path):
    """A build whose model cannot be exported yet (here --tp 2) gets a manifest saying why and no packages; the
    factory then serves it without engines, and refuses when engines are required."""
    out = tmp_path / "tp2"
    record = run_stages(BuildOptions(output=out, precision="bf16", tp=2, engine_device="cpu"), STAGES,
                        log=lambda _: None)
    assert record["stages"]["engines"]["engines"] == 0
    assert record["stages"]["engines"]["unsupported"].startswith("--tp 2: per-rank engines are not built yet")
    assert open_scheduler(out, StackOptions(compile=False)).executor.kind == "eager"
    with pytest.raises(ValueError, match="no engines"):
        open_scheduler(out, StackOptions(engines=True))
