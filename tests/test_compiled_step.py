"""Compiled decode and speculative steps (engines/executors/compiled_step.py) against the eager network, and the branch-free pool writes
they rest on (plugins/pool_rows.py) against boolean-mask indexing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (add_missing_tensors, assert_expert_paths_equal_the_loop, hf_model, make_config,
                      prefill_and_compare, save_hf_checkpoint, snapshot)

from nemo3.engines.executors.compiled_step import cpp_compiler
from nemo3.engines.executors.base import RaggedBatch, SpeculativeBatch
from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.engines.runtime.requests import GenerationParams
from nemo3.engines.runtime.scheduler import Scheduler
from nemo3.plugins.pool_rows import write_rows

needs_compiler = pytest.mark.skipif(cpp_compiler() is None, reason="torch inductor needs a C++ compiler on CPU; none found")


@pytest.mark.parametrize("index", [[3, -1, 0, -1, 5], [-1, 2, -1, 4, 1], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4]])
def test_write_rows_writes_real_rows_only(index):
    g = torch.Generator().manual_seed(len(index) + sum(index))
    pool = torch.randn(6, 3, 2, generator=g)
    values = torch.randn(len(index), 3, 2, generator=g)
    index = torch.tensor(index)
    want = pool.clone()
    want[index[index >= 0]] = values[index >= 0]
    write_rows(pool, index, values)
    assert torch.equal(pool, want)


def test_write_rows_casts_to_the_pool_dtype():
    pool = torch.zeros(3, 4, dtype=torch.bfloat16)
    values = torch.randn(2, 4)
    write_rows(pool, torch.tensor([2, -1]), values)
    assert torch.equal(pool[2], values[0].bfloat16()) and not pool[:2].any()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=64)), tmp_path_factory.mktemp("cs"))
    add_missing_tensors(folder)
    return load(folder)


@needs_compiler
def test_compiled_steps_match_eager_calls(model):
    """Prefill chunks (see conftest.prefill_and_compare), a decode step (T=1) and a greedy speculative step (2
    drafts; rows with 2, 1 and 0 drafts) give the eager executor's logits, accepted counts, tokens, drafts and pool
    contents, with rows padded to max_sequences (the padding touches no slot)."""
    eager = TorchExecutor(model, max_sequences=4, max_length=32)
    compiled = TorchExecutor(model, max_sequences=4, max_length=32, compile=True, prefill_tokens=(16,))
    compiled.warm_up(3)
    g = torch.Generator().manual_seed(1)
    prefill_and_compare(eager, compiled, [torch.randint(0, 64, (17,), generator=g).tolist() for _ in range(3)])
    ran = []  # the compiled steps really run (not the eager fallback)
    for name in ("backbone", "speculative"):
        step = getattr(compiled.compiled, name)
        setattr(compiled.compiled, name, lambda *args, step=step, name=name: ran.append(name) or step(*args))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (7, 11, 5)]
    slots = [2, 0, 3]  # slot 1 stays free: nobody may write it
    prefill = RaggedBatch.build([(p, 0, s) for p, s in zip(prompts, slots)], [6, 17, 22])
    for ex in (eager, compiled):
        out = ex.forward(prefill)
        ex.mtp_forward(RaggedBatch.build([(p[1:] + [5], 0, s) for p, s in zip(prompts, slots)], []), out.hidden)
        ex.state.layers = copy.deepcopy(eager.state.layers) if ex is compiled else ex.state.layers
    row = torch.tensor
    speculative = SpeculativeBatch(row([[5, 6, 7], [9, 1, 0], [1, 0, 0]]), row([2, 1, 0]), row([8, 12, 6]),
                                   row([2, 0, 3]), row([0.0] * 3), row([0] * 3), row([1.0] * 3), None)
    calls = [lambda ex: ex.forward(RaggedBatch.build([([5], 7, 2), ([9], 11, 0), ([1], 5, 3)], [0, 1, 2])).logits,
             lambda ex: ex.speculate(speculative)]
    for call in calls:
        want, got = call(eager), call(compiled)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5) if torch.is_tensor(want) else got == want
        after_eager, after_compiled = snapshot(eager), snapshot(compiled)
        for name, t in after_eager.items():
            assert torch.allclose(after_compiled[name], t, rtol=1e-4, atol=1e-5), name
    assert ran == ["backbone", "backbone", "speculative"]  # the prompt of 11 tokens (padded to 16), decode, MTP
    for name, t in snapshot(compiled).items():
        assert not t[1].any(), f"{name}: the free slot 1 was written"


@pytest.fixture(scope="module")
def compiled_executor(model):
    """One compiled executor for the runtime tests of every k: its decode and prefill steps compile once, each k adds
    its speculative step. Each test's Scheduler starts from the pools the previous one left (no sequence may read
    them: a new sequence's state is zeroed or masked)."""
    return TorchExecutor(model, 3, 64, compile=True, page_size=16, prefill_tokens=(16,))


@needs_compiler
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compiled_engine_generates_what_the_eager_engine_does(model, compiled_executor, k):
    """The runtime over compiled steps: greedy output of requests with MTP k and MTP off batched together (the
    latter as plain decode rows of the speculative step), joining at different steps (the 4th waits for a free
    slot), equals the eager engine's with and without MTP, token for token. Pages of 16 tokens: the sequences
    cross page boundaries and the compiled steps' bound on the pages read grows 1 -> 2."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    outputs = []
    for compile, mtp in ((False, 0), (False, k), (True, k)):
        executor = compiled_executor if compile else TorchExecutor(model, 3, 64, page_size=16, prefill_tokens=(16,))
        engine = Scheduler(executor, num_speculative_tokens=mtp)
        bounds = []  # the pages read per row by each compiled call of this run (after the warm-up)
        if compile:
            call = executor.compiled._call
            executor.compiled._call = lambda *args: bounds.append(executor.state.pages.bound) or call(*args)
        tokens, deltas = {}, []
        for i, prompt in enumerate(prompts):  # one request joins per step
            rid = engine.add_request(prompt, GenerationParams(max_tokens=12, ignore_eos=True,
                                                              num_speculative_tokens=mtp if i % 2 else 0))
            tokens[rid] = []
            deltas += engine.step()
        deltas += list(engine.run_until_done())
        for delta in deltas:
            tokens[delta.request_id] += delta.token_ids
        assert engine.slots.in_use == 0 and engine.pages.free == engine.pages.num_pages
        if compile:
            del executor.compiled._call  # (the class's method again)
            assert set(bounds) == {1, 2}
        outputs.append(list(tokens.values()))
    assert [len(t) for t in outputs[0]] == [12] * 4
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_moe_dense_and_gathered_paths_equal_the_expert_loop(model):
    """The static-shape expert paths of decode and compiled steps (gathered: few pairs; dense: more pairs than
    experts) give the per-expert loop's sum."""
    moe = next(m for m in model.modules() if type(m).__name__ == "MoE")
    # 2 tokens x top-3 = 6 pairs <= 8 experts; 9 x 3 = 27 > 8
    assert_expert_paths_equal_the_loop(moe, model.spec.hidden_size, (2, 9))
