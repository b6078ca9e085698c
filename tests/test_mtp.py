"""MTP: loading the mtp.* tensors transformers drops, and drafting with a state against the stateless reference."""

from __future__ import annotations

import pytest
import torch
from conftest import add_missing_tensors, hf_model, make_config, save_hf_checkpoint
from test_network import rel_err, single_chunk

from nemo3.engines.network.loading import load
from nemo3.export.names import expected_tensors


# Nemotron 3 Super's MTP pattern "*E", and one with a Mamba layer (its state lives in the MTP's own pools)
MTP_PATTERNS = {"attention_moe": ["full_attention", "moe"],
                "mamba_attention_moe": ["linear_attention", "full_attention", "moe"]}


@pytest.fixture(scope="module", params=sorted(MTP_PATTERNS))
def mtp_pair(request, tmp_path_factory):
    """(transformers model, the mtp tensors added to its checkpoint, our model loaded from that checkpoint)."""
    hf = hf_model(make_config("mtp", mtp_layers_block_type=MTP_PATTERNS[request.param]))
    folder = save_hf_checkpoint(hf, tmp_path_factory.mktemp("mtp"))
    mtp = add_missing_tensors(folder)
    return hf, mtp, load(folder)


def test_mtp_checkpoint_loads_every_tensor(mtp_pair):
    hf, mtp, model = mtp_pair
    state = model.state_dict()
    assert set(state) == set(expected_tensors(model.spec))
    for name, value in mtp.items():
        assert torch.equal(state[name], value), name
    single_chunk(hf)
    ids = torch.randint(0, model.spec.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model.logits(ids), hf(ids, use_cache=False).logits) <= 1e-4


def test_drafting_step_by_step_equals_the_stateless_reference(mtp_pair):
    """The runtime's calls: backbone prefill, MTP prefill, then one MTP step per further draft."""
    _, _, model = mtp_pair
    n, k, B = 10, 4, 2
    ids = torch.randint(0, model.spec.vocab_size, (B, n + 1), generator=torch.Generator().manual_seed(1))
    slots, fresh = torch.tensor([1, 0]), torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        want = model.mtp_logits(ids, k)  # prompt x_0..x_{n-1} and the chosen x_n
        state = model.new_state(max_sequences=2, max_length=n + k)
        hidden = model.final_hidden(model(ids[:, :n], state, slots, fresh))
        logits, carry = model.mtp_draft(ids[:, 1:], hidden, state, slots, fresh)
        got = [logits[:, -1]]
        for i in range(1, k):
            draft = got[-1].argmax(-1, keepdim=True)
            logits, carry = model.mtp_draft(draft, carry[:, -1:], state, slots, torch.full((B,), n + i - 1))
            got.append(logits[:, -1])
        sequence = model.mtp_sequence_logits(ids)
        # drafting left the backbone's state alone: it continues with x_n as if nothing happened in between
        continued = model.logits(ids[:, n:], state, slots, torch.full((B,), n))[:, 0]
        stateless = model.logits(ids)[:, n]
    assert rel_err(continued, stateless) <= 1e-5
    assert want.shape == (B, k, model.spec.vocab_size)
    assert rel_err(torch.stack(got, dim=1), want) <= 1e-5
    assert rel_err(sequence[:, -1], want[:, 0]) <= 1e-5


def test_mtp_one_position_at_a_time_equals_all_positions(mtp_pair):
    """The training form (all positions at once) against the MTP's own KV cache, one position per call."""
    _, _, model = mtp_pair
    T, B = 12, 3
    ids = torch.randint(0, model.spec.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    slots = torch.tensor([2, 0, 1])
    with torch.no_grad():
        want = model.mtp_sequence_logits(ids)
        hidden = model.final_hidden(model(ids))
        state = model.new_state(max_sequences=3, max_length=T)
        got = [model.mtp_draft(ids[:, t + 1:t + 2], hidden[:, t:t + 1], state, slots, torch.full((B,), t))[0]
               for t in range(T - 1)]
    assert want.shape == (B, T - 1, model.spec.vocab_size)
    assert rel_err(torch.cat(got, dim=1), want) <= 1e-5
