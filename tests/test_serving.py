"""The thread-safe serving engine Triton's model.py drives: concurrent streams batch together and match
the single-threaded runtime; cancellation ends a stream and frees its slot."""

from __future__ import annotations

import threading

import pytest
from conftest import add_missing_tensors, hf_model, make_config, save_hf_checkpoint

from nemo3.engines.runtime.requests import FinishReason, GenerationParams
from nemo3.engines.runtime.factory import load_server, open_scheduler


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=64)), tmp_path_factory.mktemp("serve"))
    add_missing_tensors(folder)
    return folder


def test_concurrent_streams_equal_the_runtime(checkpoint):
    params = GenerationParams(max_tokens=12, ignore_eos=True)
    prompts = [[3 + i, 9, 17, 4 + 2 * i] for i in range(8)]
    want = [r.token_ids for r in open_scheduler(checkpoint).generate(prompts, params)]
    engine = load_server(checkpoint, num_speculative_tokens=2)
    got = {}

    def run(i):
        got[i] = [t for d in engine.stream(prompts[i], params, f"r{i}") for t in d.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [got[i] for i in range(8)] == want
    engine.close()
    assert engine.engine.slots.in_use == 0


def test_cancel_and_refusal(checkpoint):
    engine = load_server(checkpoint)
    stream = engine.stream([5, 6, 7], GenerationParams(max_tokens=200, ignore_eos=True), "long")
    first = next(stream)
    assert not first.finished and engine.cancel("long")
    assert list(stream)[-1].finish_reason is FinishReason.CANCELLED
    assert not engine.cancel("long") and not engine.cancel("unknown")
    (refused,) = engine.stream([5], GenerationParams(max_tokens=10**6), "huge")
    assert refused.finish_reason is FinishReason.REFUSED and "max_length" in refused.stats["error"]
    engine.close()
    assert engine.engine.slots.in_use == 0


def test_abandoned_stream_frees_its_slot_and_engine_errors_reach_streams(checkpoint):
    engine = load_server(checkpoint)
    stream = engine.stream([5, 6, 7], GenerationParams(max_tokens=200, ignore_eos=True), "gone")
    next(stream)
    stream.close()  # the client went away
    for _ in range(100):
        if engine.engine.slots.in_use == 0:
            break
        threading.Event().wait(0.02)
    assert engine.engine.slots.in_use == 0

    def broken_step():
        raise RuntimeError("executor exploded")

    engine.engine.step = broken_step
    with pytest.raises(RuntimeError, match="nemo3 engine stopped: RuntimeError: executor exploded"):
        list(engine.stream([5, 6], GenerationParams(max_tokens=5), "doomed"))
    with pytest.raises(RuntimeError, match="engine stopped"):  # later requests fail at once
        list(engine.stream([5], GenerationParams(max_tokens=5), "after"))
