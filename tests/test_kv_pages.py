"""The paged KV cache in the runtime: pages allocated as sequences grow and freed when they end; running out
of pages queues or preempts (recompute) and every request still finishes with the text it would have had;
the planner's max concurrent sequences is what the runtime admits (one page accounting, export/kv_pages.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import add_missing_tensors, hf_model, make_config, save_hf_checkpoint

from nemo3.engines.executors.sequence_budget import sequence_budget
from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.loading import load
from nemo3.engines.network.model import Model
from nemo3.engines.network.parallel import Parallel
from nemo3.engines.runtime.factory import StackOptions, open_scheduler
from nemo3.engines.runtime.requests import FinishReason, GenerationParams
from nemo3.engines.runtime.scheduler import Scheduler
from nemo3.export.kv_pages import pages_for
from nemo3.export.planner import plan, sequence_state
from nemo3.export.spec import ModelSpec


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=64)), tmp_path_factory.mktemp("pages"))
    add_missing_tensors(folder)
    return load(folder)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(l),), generator=g).tolist() for l in torch.randint(5, 40, (n,), generator=g)]


def run(model, num_pages, k=0, max_sequences=4, page_size=16):
    """Greedy outputs of six requests of 30 new tokens, and the scheduler after them."""
    engine = Scheduler(TorchExecutor(model, max_sequences, 128, num_pages=num_pages, page_size=page_size),
                       max_num_tokens=24, num_speculative_tokens=k)
    out = engine.generate(prompts(6), GenerationParams(max_tokens=30, ignore_eos=True))
    assert engine.pages.free == engine.pages.num_pages and engine.slots.in_use == 0  # everything given back
    return out, engine


@pytest.mark.parametrize("k", [0, 2])
def test_running_out_of_pages_preempts_and_every_request_finishes_with_the_same_text(model, k):
    ample, _ = run(model, None, k)  # every slot owns max_length tokens of pages: nothing waits for pages
    # 9 pages of 16 tokens: about two sequences at a time; growing ones preempt the newest, which recomputes
    scarce, engine = run(model, 9, k)
    assert [r.token_ids for r in scarce] == [r.token_ids for r in ample]
    assert all(r.finish_reason is FinishReason.LENGTH and len(r.token_ids) == 30 for r in scarce)
    assert sum(r.stats.get("preemptions", 0) for r in scarce) > 0


def test_a_request_that_can_never_fit_is_refused(model):
    engine = Scheduler(TorchExecutor(model, 2, 128, num_pages=2, page_size=16))
    [result] = engine.generate([list(range(3, 30))], GenerationParams(max_tokens=10))  # 37 tokens: 3 pages
    assert result.finish_reason is FinishReason.REFUSED and "3 KV pages of 16 tokens" in result.stats["error"]


def test_the_planners_max_sequences_is_what_the_runtime_admits(model, tmp_path):
    """`nemo3 plan`'s memory for sequences, given to the runtime (StackOptions.state_memory), builds exactly the
    planned slots and pages: the planned number of sequences of `context` tokens run at once without a
    preemption, the next one waits, and the state takes the bytes the planner predicts."""
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=64)), tmp_path)
    add_missing_tensors(folder)
    spec, context = model.spec, 200  # 4 pages of 64 tokens
    weights = plan(spec, "bf16", gpu_memory=2**30, context=context).weights[0]["total"]
    state = sequence_state(spec, 1, "bf16")
    p = plan(spec, "bf16", gpu_memory=weights + 3 * state.bytes(context) + state.fixed, context=context, reserve=0.0)
    assert p.max_sequences == 3 and p.num_pages == 3 * pages_for(context, p.page_size)
    engine = open_scheduler(folder, StackOptions(dtype=torch.bfloat16, max_length=context, max_num_tokens=512,
                                                 state_memory=p.free_for_sequences))
    assert (engine.executor.max_sequences, engine.pages.num_pages) == (p.max_sequences, p.num_pages)
    assert engine.executor.state.nbytes() == p.max_sequences * p.per_sequence["total"]
    for prompt in prompts(4, seed=1):
        engine.add_request(prompt, GenerationParams(max_tokens=context - len(prompt), ignore_eos=True))
    engine.step()
    assert len(engine.running) == 3 and len(engine.waiting) == 1
    while engine.has_work():
        engine.step()
        assert not any(s.preemptions for s in engine.running.values())
    assert engine.pages.free == p.num_pages


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_each_tp_rank_allocates_the_state_the_planner_plans_for_it(kv_heads, kv_dtype):
    """At tp 2 the planner's per-rank state (each rank's half of the Mamba heads and conv channels, its KV
    heads, or one replicated head when the ranks outnumber them) is what each sharded rank's model allocates
    for the slots and pages sequence_budget gives it from the plan's memory."""
    spec = ModelSpec.from_config(make_config("mtp", vocab_size=64, num_key_value_heads=kv_heads))
    context, tp = 200, 2
    state = sequence_state(spec, tp, kv_dtype)
    assert state.per_page < sequence_state(spec, 1, kv_dtype).per_page or kv_heads == 1
    weights = plan(spec, "bf16", tp=tp, context=context, kv_dtype=kv_dtype).weights[0]["total"]
    p = plan(spec, "bf16", tp=tp, gpu_memory=weights + 3 * state.bytes(context) + state.fixed, context=context,
             kv_dtype=kv_dtype, reserve=0.0)
    for rank in range(tp):
        model = Model(spec, Parallel(tp, rank)).to(torch.bfloat16)
        if kv_dtype == "fp8":  # what an FP8 KV recipe's rank weights carry
            for name, module in model.named_modules():
                if name.endswith("k_proj"):
                    module.register_buffer("k_scale", torch.ones(()))
        max_sequences, num_pages = sequence_budget(model, 8, context, p.free_for_sequences)
        assert (max_sequences, num_pages) == (p.max_sequences, p.num_pages) == (3, 3 * pages_for(context))
        pools = model.new_state(max_sequences, context, num_pages=num_pages)
        assert pools.nbytes() == p.max_sequences * p.per_sequence["total"], rank


@pytest.mark.slow
def test_a_32k_token_prompt_generates_in_chunks_within_the_planned_memory():
    """The built-in model on CPU: a 32k-token prompt prefilled in chunks over pages, then decoded, in a runtime
    given exactly the memory the planner's accounting says one such sequence needs."""
    from nemo3.export.builtin import BUILTIN_DIR

    if not (BUILTIN_DIR / "model.safetensors").exists():
        pytest.skip("the built-in model has not been trained into export/builtin/ yet")
    torch.set_num_threads(1)
    spec = load(BUILTIN_DIR).spec
    context = 32768 + 8
    memory = sequence_state(spec, 1, "fp32", conv_bytes=4).bytes(context)  # float32 on CPU
    engine = open_scheduler(None, StackOptions(max_length=context, max_num_tokens=1024, state_memory=memory))
    assert engine.executor.max_sequences == 1 and engine.executor.state.nbytes() == memory
    prompt = torch.randint(3, spec.vocab_size, (32768,), generator=torch.Generator().manual_seed(0)).tolist()
    [result] = engine.generate([prompt], GenerationParams(max_tokens=8, ignore_eos=True))
    assert result.finish_reason is FinishReason.LENGTH and len(result.token_ids) == 8
    assert engine.pages.free == engine.pages.num_pages == pages_for(context, engine.pages.page_size)


def test_page_updates_travel_to_the_ranks():
    """A tensor-parallel leader's message carries the batch's page updates, a forward's and a speculative step's:
    every rank maps the same pages."""
    from nemo3.engines.executors.base import RaggedBatch, SpeculativeBatch
    from nemo3.engines.executors.distributed import (FORWARD, SPECULATE, _decode, _decode_speculative, _encode,
                                                     _encode_speculative, _read)
    from nemo3.engines.network.parallel import SINGLE

    batch = RaggedBatch.build([([4, 5], 0, 1), ([6], 9, 0)], [1, 2], pages=[(1, 0, [5, 7]), (0, 2, [3])])
    message = torch.frombuffer(bytearray(_encode(FORWARD, batch)), dtype=torch.long)
    (command, _, n, s, l, _), body, pages = _read(message)
    decoded = _decode(body, n, s, l, pages)
    assert command == FORWARD and decoded.pages == batch.pages and torch.equal(decoded.slots, batch.slots)
    speculative = SpeculativeBatch(torch.tensor([[4, 8, 0], [6, 0, 0]]), torch.tensor([1, 0]), torch.tensor([9, 3]),
                                   torch.tensor([1, 0]), torch.zeros(2), torch.zeros(2, dtype=torch.long),
                                   torch.ones(2), None, torch.tensor([[0, 1, 2]]), pages=[(0, 1, [6])])
    (command, flag, n, s, l, _), body, pages = _read(torch.frombuffer(bytearray(_encode_speculative(speculative)),
                                                                      dtype=torch.long))
    decoded = _decode_speculative(body, flag, n, s, l, pages, SINGLE, "cpu")
    assert command == SPECULATE and decoded.pages == speculative.pages
    for name in ("token_ids", "num_drafts", "past_lengths", "slots", "banned"):
        assert torch.equal(getattr(decoded, name), getattr(speculative, name)), name
