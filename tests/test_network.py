"""The network (engines/) against transformers' NemotronHForCausalLM, and its stateful paths against itself."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CONFIGS, hf_model, make_config, save_hf_checkpoint

import nemo3
from nemo3.engines.network.loading import load
from nemo3.engines.network.mamba2 import MAX_STEP_TOKENS
from nemo3.engines.network.model import Model
from nemo3.export.names import expected_tensors
from nemo3.export.spec import ModelSpec

SEQ = 21  # not a multiple of chunk_size=8: three chunks, the last one partial


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def single_chunk(hf) -> None:
    """transformers 5.14's NemotronH torch_forward sums the inter-chunk recurrence over the wrong axis
    (huggingface/transformers#47246), so its output is wrong whenever a sequence spans several chunks.
    The chunk size does not change the math of a correct scan: run the oracle with one chunk."""
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "chunk_size"):
            layer.mixer.chunk_size = 4 * SEQ


@pytest.fixture(scope="module", params=sorted(n for n in CONFIGS if n != "mtp"))  # mtp: test_mtp.py
def pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained checkpoint folder, our model loaded from that folder)."""
    hf = hf_model(make_config(request.param))
    folder = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, folder, load(folder)


def test_logits_match_transformers(pair):
    hf, _, model = pair
    single_chunk(hf)
    ids = torch.randint(0, hf.config.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = model.logits(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def test_prefill_then_decode_equals_one_forward(pair):
    model = pair[2]
    n, m, B = 11, 5, 3
    ids = torch.randint(0, model.spec.vocab_size, (B, n + m), generator=torch.Generator().manual_seed(2))
    slots = torch.tensor([2, 0, 3])
    with torch.no_grad():
        want = model.logits(ids)
        state = model.new_state(max_sequences=4, max_length=32)
        got = [model.logits(ids[:, :n], state, slots, torch.zeros(B, dtype=torch.long))]
        for i in range(m):
            got.append(model.logits(ids[:, n + i:n + i + 1], state, slots, torch.full((B,), n + i)))
    assert rel_err(torch.cat(got, dim=1), want) <= 1e-5


def test_chunked_prefill_continues_the_state(pair):
    """Chunks that run the scan (long) and the decode ops (short) continue each other exactly."""
    model = pair[2]
    cuts = [0, 9, 12, SEQ]  # scan from scratch, decode ops, scan continuing from the stored state
    assert cuts[1] > MAX_STEP_TOKENS >= cuts[2] - cuts[1] and cuts[3] - cuts[2] > MAX_STEP_TOKENS
    ids = torch.randint(0, model.spec.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([1, 0])
    with torch.no_grad():
        state = model.new_state(max_sequences=2, max_length=SEQ)
        whole = model.logits(ids, state, slots, torch.zeros(2, dtype=torch.long))
        whole_ssm = {k: v.ssm.clone() for k, v in state.layers.items() if hasattr(v, "ssm")}
        state = model.new_state(max_sequences=2, max_length=SEQ)
        parts = [model.logits(ids[:, a:b], state, slots, torch.full((2,), a)) for a, b in itertools.pairwise(cuts)]
    assert rel_err(torch.cat(parts, dim=1), whole) <= 1e-5
    for key, ssm in whole_ssm.items():
        assert rel_err(state[key].ssm, ssm) <= 1e-5


def test_decode_rows_with_different_past_lengths_and_padding(pair):
    model = pair[2]
    lengths = [4, 9, 13]
    ids = torch.randint(0, model.spec.vocab_size, (3, 16), generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([1, 3, 0])
    with torch.no_grad():
        want = model.logits(ids)
        state = model.new_state(max_sequences=4, max_length=16)
        for row, n in enumerate(lengths):  # prefill each sequence on its own
            model(ids[row:row + 1, :n], state, slots[row:row + 1], torch.zeros(1, dtype=torch.long))
        untouched = {k: [t.clone() for t in vars(v).values() if isinstance(t, torch.Tensor)]
                     for k, v in state.layers.items()}
        # one decode call: the three sequences at their own lengths, plus a padding row
        tokens = torch.stack([ids[row, n] for row, n in enumerate(lengths)] + [ids[0, 0]])[:, None]
        got = model.logits(tokens, state, torch.tensor([1, 3, 0, -1]), torch.tensor(lengths + [7]))
    for row, n in enumerate(lengths):
        assert rel_err(got[row, 0], want[row, n]) <= 1e-5
    for key, before in untouched.items():  # slot 2 belongs to nobody: the padding row must not write it
        for t_before, t_after in zip(before, vars(state[key]).values()):
            assert torch.equal(t_before[2], t_after[2])


def test_bfloat16(pair):
    """bf16 weights and activations (fp32 router bias, SSM state and softmax). A near-tie in routing can
    pick another expert in bf16 than in fp32, so positions are compared by their median error."""
    _, folder, model = pair
    bf16 = load(folder, dtype=torch.bfloat16)
    assert bf16.backbone.layers[0].norm.weight.dtype == torch.bfloat16
    for module in bf16.modules():
        if hasattr(module, "e_score_correction_bias"):
            assert module.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, model.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    slots = torch.tensor([0, 1])
    with torch.no_grad():
        want = model.logits(ids)
        got = bf16.logits(ids)
        state = bf16.new_state(max_sequences=2, max_length=12)
        assert state[f"backbone.layers.{model.spec.pattern.index('*')}"].k.dtype == torch.bfloat16
        assert state[f"backbone.layers.{model.spec.pattern.index('M')}"].ssm.dtype == torch.float32
        bf16(ids[:, :9], state, slots, torch.zeros(2, dtype=torch.long))
        steps = torch.cat([bf16.logits(ids[:, t:t + 1], state, slots, torch.full((2,), t)) for t in range(9, 12)], 1)

    def median_rel_err(a, b):
        return ((a - b).abs().amax(-1) / b.abs().max()).median().item()

    assert got.dtype == torch.float32 and median_rel_err(got, want) < 0.02
    assert median_rel_err(steps, got[:, 9:]) < 0.02


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_is_the_canonical_names(name):
    spec = ModelSpec.from_config(make_config(name))
    with torch.device("meta"):
        model = Model(spec)
    expected = expected_tensors(spec)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.num_parameters() == sum(torch.Size(s).numel() for s in expected.values())
    assert model.spec is spec


def test_top_level_load(tiny_checkpoint):
    hf, folder = tiny_checkpoint
    model = nemo3.load(folder)
    ids = torch.arange(7)[None] % hf.config.vocab_size
    with torch.no_grad():
        assert rel_err(model.logits(ids), hf(ids, use_cache=False).logits) <= 1e-4


def test_bad_calls_name_the_problem(tiny_checkpoint):
    _, folder = tiny_checkpoint
    model = load(folder)
    state = model.new_state(max_sequences=2, max_length=8)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="slots"):
        model(ids, state)
    with pytest.raises(ValueError, match="max_length=8"):
        model(ids, state, torch.tensor([0, 1]), torch.tensor([6, 0]))
    with pytest.raises(ValueError, match="max_sequences=2"):
        model(ids, state, torch.tensor([0, 2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="no MTP"):
        model.mtp_draft(ids, torch.zeros(2, 4, model.spec.hidden_size))
