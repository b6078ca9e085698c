"""The runtime: continuous batching, chunked prefill, sampling, stops, cancellation, reasoning budget and
MTP speculative decoding, checked against the stateless network (greedy decoding by full forwards)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import add_missing_tensors, hf_model, make_config, save_hf_checkpoint

from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.engines.runtime.requests import FinishReason, GenerationParams
from nemo3.engines.runtime.scheduler import Scheduler
from nemo3.engines.runtime.text import TextCodec


@pytest.fixture(scope="module", params=["random", "builtin"])
def model_and_codec(request, tmp_path_factory):
    if request.param == "random":
        folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=64)), tmp_path_factory.mktemp("rt"))
        add_missing_tensors(folder)
    else:
        from nemo3.export.builtin import BUILTIN_DIR

        folder = BUILTIN_DIR
        if not (folder / "model.safetensors").exists():
            pytest.skip("the built-in model has not been trained into export/builtin/ yet")
    model = load(folder)
    return model, TextCodec.from_checkpoint(folder, model.spec)


def make_engine(model_and_codec, max_sequences=4, max_length=160, **kwargs) -> Scheduler:
    model, codec = model_and_codec
    return Scheduler(TorchExecutor(model, max_sequences, max_length), codec, **kwargs)


def prompts(model, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.spec.vocab_size, (int(l),), generator=g).tolist()
            for l in torch.randint(5, 30, (n,), generator=g)]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full stateless forwards: the oracle for the runtime."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def no_eos(max_tokens: int, **kwargs) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, ignore_eos=True, **kwargs)


def assert_idle(engine: Scheduler) -> None:
    assert engine.slots.in_use == 0 and not engine.running and not engine.waiting


def test_greedy_equals_full_forward_decoding(model_and_codec):
    model, _ = model_and_codec
    engine = make_engine(model_and_codec, max_num_tokens=16)  # prompts > 16 tokens prefill in chunks
    ps = prompts(model, 5)
    results = engine.generate(ps, no_eos(12))
    for p, r in zip(ps, results):
        assert r.token_ids == greedy_reference(model, p, 12)
        assert r.finish_reason is FinishReason.LENGTH
    assert_idle(engine)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_greedy_output_is_identical(model_and_codec, k):
    model, _ = model_and_codec
    ps = prompts(model, 4, seed=k)
    plain = make_engine(model_and_codec).generate(ps, no_eos(24))
    engine = make_engine(model_and_codec, num_speculative_tokens=k)
    spec = engine.generate(ps, no_eos(24))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    for r in spec:
        assert r.stats["verify_steps"] > 0 and 1 <= r.stats["acceptance_length"] <= k + 1
    assert_idle(engine)


def test_mtp_acceptance_varies_on_the_builtin_model(model_and_codec):
    """A trained MTP head is right sometimes and wrong sometimes: accepted lengths vary step to step."""
    model, codec = model_and_codec
    if codec.tokenizer is None:
        pytest.skip("random weights: acceptance is near zero")
    engine = make_engine(model_and_codec, num_speculative_tokens=3)
    (r,) = engine.generate(["def fibonacci(n):\n"], no_eos(60))
    rates = r.stats["acceptance_rate_per_position"]
    assert 0 < rates[0] < 1 and r.stats["acceptance_length"] > 1.2
    assert r.token_ids == greedy_reference(model, codec.encode("def fibonacci(n):\n"), 60)


def test_output_does_not_depend_on_batch_mates(model_and_codec):
    model, _ = model_and_codec
    ps = prompts(model, 4, seed=7)
    alone = make_engine(model_and_codec).generate([ps[0]], no_eos(20))[0].token_ids
    engine = make_engine(model_and_codec, max_num_tokens=8, num_speculative_tokens=2)
    target = engine.add_request(ps[0], no_eos(20))
    got, joined = [], False
    for step in range(200):
        if step == 3:
            engine.add_request(ps[1], no_eos(5))  # joins mid-way, leaves early
            victim = engine.add_request(ps[2], no_eos(50))
        if step == 6:
            assert engine.cancel(victim)  # leaves mid-way
        if step == 8:
            engine.add_request(ps[3], no_eos(30))
            joined = True
        for d in engine.step():
            if d.request_id == target:
                got += d.token_ids
        if not engine.has_work():
            break
    assert joined and got == alone
    assert_idle(engine)


def test_seed_reproducibility(model_and_codec):
    model, _ = model_and_codec
    p = prompts(model, 1, seed=3)[0]
    params = no_eos(16, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    a = make_engine(model_and_codec).generate([p], params)[0].token_ids
    b = make_engine(model_and_codec).generate([p, p], [params, no_eos(16, temperature=1.0, seed=5)])[0].token_ids
    c = make_engine(model_and_codec).generate([p], GenerationParams(**{**params.__dict__, "seed": 99}))[0].token_ids
    assert a == b and a != c


def test_sampling_with_mtp_is_reproducible(model_and_codec):
    model, _ = model_and_codec
    p = prompts(model, 1, seed=4)[0]
    params = no_eos(16, temperature=0.8, seed=7)
    runs = [make_engine(model_and_codec, num_speculative_tokens=2).generate([p], params)[0] for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 16


def test_stop_token_ids_and_cancellation(model_and_codec):
    model, _ = model_and_codec
    p = prompts(model, 1, seed=5)[0]
    free = greedy_reference(model, p, 10)
    engine = make_engine(model_and_codec)
    (r,) = engine.generate([p], no_eos(10, stop_token_ids=(free[4],)))
    assert r.token_ids == free[:free.index(free[4]) + 1] and r.finish_reason is FinishReason.STOP
    rid = engine.add_request(p, no_eos(100))
    engine.step()
    engine.step()
    assert engine.slots.in_use == 1
    assert engine.cancel(rid) and engine.slots.in_use == 0  # the slot is free at once
    deltas = list(engine.run_until_done())
    assert deltas[-1].finished and deltas[-1].finish_reason is FinishReason.CANCELLED
    assert not engine.cancel(rid)
    assert_idle(engine)


def test_stop_strings_cut_the_text(model_and_codec):
    _, codec = model_and_codec
    if codec.tokenizer is None:
        pytest.skip("stop strings need a tokenizer")
    engine = make_engine(model_and_codec)
    (free,) = engine.generate(["import os\n"], no_eos(40))
    stop = free.text[10:13]
    streamed = "".join(d.text for d in engine.stream("import os\n", no_eos(40, stop=(stop,))))
    assert streamed == free.text[:free.text.index(stop)]
    assert_idle(engine)


def masked_greedy_reference(model, prompt: list[int], stop: int, min_tokens: int, n: int) -> list[int]:
    """Greedy full forwards where `stop` cannot be chosen among the first `min_tokens` outputs and ends the
    output after that: the oracle for min_tokens."""
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) - len(prompt) < n and (len(ids) - len(prompt) <= min_tokens or ids[-1] != stop):
            logits = model.logits(torch.tensor([ids]))[0, -1]
            if len(ids) - len(prompt) < min_tokens:
                logits[stop] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def eos_engine(model_and_codec, eos: int, k: int) -> Scheduler:
    """An engine whose end-of-sequence token is `eos` (a token the model produces early)."""
    model, codec = model_and_codec
    codec = copy.copy(codec)
    codec.eos_ids = {eos}
    return Scheduler(TorchExecutor(model, 4, 160), codec, num_speculative_tokens=k)


@pytest.mark.parametrize("k", [0, 2])
def test_min_tokens_holds_back_eos_greedy(model_and_codec, k):
    model, _ = model_and_codec
    p = prompts(model, 1, seed=5)[0]
    free = greedy_reference(model, p, 16)
    eos, m = free[1], 6
    engine = eos_engine(model_and_codec, eos, k)
    (plain,) = engine.generate([p], GenerationParams(max_tokens=16))
    assert plain.token_ids == free[:free.index(eos) + 1] and len(plain.token_ids) < m
    (held,) = engine.generate([p], GenerationParams(max_tokens=16, min_tokens=m))
    assert held.token_ids == masked_greedy_reference(model, p, eos, m, 16)
    assert eos not in held.token_ids[:m] and len(held.token_ids) > m
    assert held.finish_reason is (FinishReason.STOP if held.token_ids[-1] == eos else FinishReason.LENGTH)
    assert_idle(engine)


@pytest.mark.parametrize("k", [0, 2])
def test_min_tokens_holds_back_eos_sampled(model_and_codec, k):
    """Sampling with a likely end-of-sequence token: without min_tokens some seeds end early, with it none."""
    model, _ = model_and_codec
    p, m, seeds = prompts(model, 1, seed=6)[0], 8, range(12)
    free = make_engine(model_and_codec).generate([p] * len(seeds), [no_eos(m, temperature=0.7, seed=s) for s in seeds])
    counts = collections.Counter(t for r in free for t in r.token_ids)
    eos = counts.most_common(1)[0][0]
    engine = eos_engine(model_and_codec, eos, k)
    plain = engine.generate([p] * len(seeds), [GenerationParams(max_tokens=16, temperature=0.7, seed=s) for s in seeds])
    assert any(len(r.token_ids) < m for r in plain)
    held = engine.generate([p] * len(seeds), [GenerationParams(max_tokens=16, min_tokens=m, temperature=0.7, seed=s)
                                             for s in seeds])
    for r in held:
        assert eos not in r.token_ids[:m] and len(r.token_ids) > m
        assert eos not in r.token_ids[m:-1] and (r.token_ids[-1] == eos or len(r.token_ids) == 16)
    assert_idle(engine)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_min_tokens_holds_back_stop_strings(model_and_codec, k, temperature):
    """A stop string inside the text of the first min_tokens tokens does not end the output; the first one
    after it does. Stop strings do not change the tokens drawn, so the same seed without stops is the oracle."""
    _, codec = model_and_codec
    if codec.tokenizer is None:
        pytest.skip("stop strings need a tokenizer")
    engine = make_engine(model_and_codec, num_speculative_tokens=k)
    m, base = 8, dict(max_tokens=40, temperature=temperature, seed=3)
    (free,) = engine.generate(["import os\n"], no_eos(**base))
    head = codec.decode(free.token_ids[:m])
    stop = head.strip()[:2]
    assert stop and free.text.index(stop) < len(head)
    early = "".join(d.text for d in engine.stream("import os\n", no_eos(**base, stop=(stop,))))
    assert early == free.text[:free.text.index(stop)]
    held = "".join(d.text for d in engine.stream("import os\n", no_eos(**base, stop=(stop,), min_tokens=m)))
    cut = free.text.find(stop, len(head))
    assert held == (free.text if cut < 0 else free.text[:cut]) and len(held) >= len(head)
    assert_idle(engine)


def test_min_tokens_must_fit_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens=9: must be in \[0, max_tokens=8\]"):
        GenerationParams(max_tokens=8, min_tokens=9)
    with pytest.raises(ValueError, match="min_tokens=-1"):
        GenerationParams(min_tokens=-1)


def test_reasoning_budget_forces_end_of_thinking(model_and_codec):
    _, codec = model_and_codec
    if codec.think_end is None:
        pytest.skip("needs a tokenizer with <think> / </think>")
    for k in (0, 2):
        engine = make_engine(model_and_codec, num_speculative_tokens=k)
        (r,) = engine.generate(["<think>"], no_eos(30, think_budget=5))
        assert r.token_ids[5] == codec.think_end and codec.think_end not in r.token_ids[:5]
        assert len(r.token_ids) == 30  # the answer continues after </think>
        assert_idle(engine)


def test_requests_that_cannot_fit_are_refused_and_others_wait(model_and_codec):
    model, _ = model_and_codec
    engine = make_engine(model_and_codec, max_sequences=2, max_length=40)
    too_long = engine.add_request(list(range(3, 30)), no_eos(20))
    ids = [engine.add_request(p, no_eos(4)) for p in prompts(model, 5, seed=9)]
    finished = {}
    for d in engine.run_until_done():
        assert engine.slots.in_use <= 2
        if d.finished:
            finished[d.request_id] = d
    assert finished[too_long].finish_reason is FinishReason.REFUSED and "max_length=40" in finished[too_long].stats["error"]
    assert all(finished[i].finish_reason is FinishReason.LENGTH for i in ids)
    assert_idle(engine)


def test_commit_steps_rolls_mamba_state_back_to_the_accepted_prefix(model_and_codec):
    """A verify forward over 4 tokens, then keeping the state after token j, equals having fed only j+1 tokens."""
    from nemo3.engines.executors.base import RaggedBatch

    model, _ = model_and_codec
    ids = prompts(model, 1, seed=11)[0][:12]
    n = len(ids) - 5
    for j in range(4):
        verify, plain = TorchExecutor(model, 2, 32), TorchExecutor(model, 2, 32)
        for ex in (verify, plain):
            ex.forward(RaggedBatch.build([(ids[:n], 0, 1)], []))
        verify.forward(RaggedBatch.build([(ids[n:n + 4], n, 1)], [], keep_steps=True))
        verify.commit_steps([1], [j])
        plain.forward(RaggedBatch.build([(ids[n:n + j + 1], n, 1)], []))
        nxt = RaggedBatch.build([([ids[n + j + 1]], n + j + 1, 1)], [0])
        assert torch.allclose(verify.forward(nxt).logits, plain.forward(nxt).logits, atol=1e-5, rtol=1e-5)


def test_abandoned_stream_frees_its_slot(model_and_codec):
    model, _ = model_and_codec
    engine = make_engine(model_and_codec)
    stream = engine.stream(prompts(model, 1)[0], no_eos(50))
    next(stream)
    assert engine.slots.in_use == 1
    stream.close()
    assert_idle(engine)
    assert not list(engine.run_until_done())  # nothing left to report for it
