"""No request can take the runtime down: every GenerationParams field is checked at the boundary (one line
naming the field), an exception while stepping fails only the requests of that step and frees their slots,
and the serving engine says when it truly cannot go on (its readiness)."""

from __future__ import annotations

import math

import pytest
from conftest import add_missing_tensors, hf_model, make_config, save_hf_checkpoint

from nemo3.engines.runtime.requests import FinishReason, GenerationParams
from nemo3.engines.runtime.factory import StackOptions, load_server, open_scheduler
from nemo3.engines.runtime.serving import MAX_FAILED_STEPS

BAD_FIELDS = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("max_tokens", True),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -math.inf), ("temperature", -0.1),
    ("top_k", -1), ("top_k", 1.5),
    ("top_p", math.nan), ("top_p", math.inf), ("top_p", 0.0), ("top_p", 1.5),
    ("seed", -1), ("seed", 2**64), ("seed", math.nan),
    ("stop", ("",)), ("stop", ["x"]), ("stop_token_ids", (-1,)), ("stop_token_ids", [2]),
    ("ignore_eos", 1), ("think_budget", -1), ("think_budget", math.inf),
    ("num_speculative_tokens", -1), ("num_speculative_tokens", 1000),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_every_field_is_checked_at_the_boundary(field, value):
    with pytest.raises(ValueError) as info:
        GenerationParams(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}=") and "\n" not in message


def test_good_edge_values_pass():
    GenerationParams(max_tokens=1, temperature=0.0, top_k=0, top_p=1.0, seed=0, think_budget=0)
    GenerationParams(seed=2**64 - 1, stop=("\n\n",), stop_token_ids=(0, 5), num_speculative_tokens=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=64)), tmp_path_factory.mktemp("safety"))
    add_missing_tensors(folder)
    return folder


def no_eos(**kwargs) -> GenerationParams:
    return GenerationParams(max_tokens=6, ignore_eos=True, **kwargs)


def test_bad_token_ids_are_refused_by_name(checkpoint):
    engine = open_scheduler(checkpoint, StackOptions(max_sequences=2, max_length=64))
    with pytest.raises(ValueError, match=r"^prompt token id=64: must be <= 63$"):
        engine.add_request([5, 64], no_eos())
    with pytest.raises(ValueError, match=r"^stop_token_ids token id=99: must be <= 63$"):
        engine.add_request([5], no_eos(stop_token_ids=(99,)))
    with pytest.raises(ValueError, match="prompt token id=-2"):
        engine.add_request([-2], no_eos())
    assert not engine.has_work()


def test_a_request_failing_in_its_step_fails_alone(checkpoint):
    """temperature 1e-40 is a valid number, but logits / 1e-40 overflow to inf and sampling raises: only that
    request ends (FinishReason.ERROR, one line), its batch mates produce what they produce alone."""
    engine = open_scheduler(checkpoint, StackOptions(max_sequences=3, max_length=64, num_speculative_tokens=2))
    want = [r.token_ids for r in engine.generate([[5, 6, 7], [9, 3]], no_eos())]
    results = engine.generate([[5, 6, 7], [8, 8, 8], [9, 3]], [no_eos(), no_eos(temperature=1e-40), no_eos()])
    assert [results[0].token_ids, results[2].token_ids] == want
    failed = results[1]
    assert failed.finish_reason is FinishReason.ERROR and failed.token_ids == []
    assert failed.stats["error"].startswith("RuntimeError: ") and "\n" not in failed.stats["error"]
    assert engine.slots.in_use == 0 and not engine.running
    assert [r.token_ids for r in engine.generate([[5, 6, 7], [9, 3]], no_eos())] == want  # serving on


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(checkpoint):
    serving = load_server(checkpoint, max_sequences=4, max_length=64)
    engine = serving.engine
    forward = engine.executor.forward
    want = list(serving.stream([4, 4, 2], no_eos(), "before"))[-1]
    failures = {"left": 1}

    def flaky_forward(batch):  # the device fails once (what a CUDA error or an OOM looks like to the runtime)
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return forward(batch)

    engine.executor.forward = flaky_forward
    (failed,) = list(serving.stream([4, 4, 2], no_eos(), "unlucky"))
    assert failed.finish_reason is FinishReason.ERROR
    assert failed.stats["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert engine.slots.in_use == 0 and serving.ready()
    again = list(serving.stream([4, 4, 2], no_eos(), "after"))
    assert [t for d in again for t in d.token_ids] and again[-1].finish_reason is FinishReason.LENGTH
    assert again[-1].stats["output_tokens"] == want.stats["output_tokens"]

    failures["left"] = 10**9  # the device is gone: every step fails, and readiness says so
    for i in range(MAX_FAILED_STEPS):
        assert serving.ready()
        assert list(serving.stream([3, 2], no_eos(), f"doomed{i}"))[-1].finish_reason is FinishReason.ERROR
    assert not serving.ready() and engine.slots.in_use == 0
    serving.close()


def test_a_bad_request_reaches_only_its_stream(checkpoint):
    serving = load_server(checkpoint, max_sequences=2, max_length=64)
    with pytest.raises(ValueError, match="prompt token id=1000"):
        list(serving.stream([1000], no_eos(), "bad"))
    with pytest.raises(ValueError, match="params: expected GenerationParams"):
        list(serving.stream([3], {"temperature": math.nan}, "worse"))
    assert list(serving.stream([3, 4], no_eos(), "good"))[-1].finish_reason is FinishReason.LENGTH
    assert serving.ready()
    serving.close()


def test_cuda_on_a_machine_without_it_is_one_line(checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"device='cuda'.*set the model's config.pbtxt parameter device to \"cpu\""):
        load_server(checkpoint, device="cuda")
