"""plugins/latent_moe_route.py: reference vs transformers' NemotronHTopkRouter, Triton kernel vs reference."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, also when this file runs alone

import pytest
import torch

from conftest import make_config
from nemo3.plugins.dispatch import interpreter_enabled, triton_available
from nemo3.plugins.latent_moe_route import latent_moe_route, latent_moe_route_reference

needs_triton = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                  reason="triton is not importable or TRITON_INTERPRET is off: "
                                         "the Triton kernel cannot run on CPU")

# (experts, top_k, n_group, topk_group)
ROUTINGS = {
    "latent_grouped": (8, 3, 4, 2),
    "nano": (128, 6, 1, 1),
    "super": (512, 22, 1, 1),
    "grouped_64": (64, 8, 8, 3),
    "one_expert_groups": (8, 2, 8, 4),
    "nonpow2_groups": (96, 32, 6, 4),   # 16 experts per group, top_k 32 from the 64 kept
}


def random_logits(T, E, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties between experts and between groups
        logits = torch.randint(-1, 2, (T, E), generator=g).float()
        bias = 0.25 * torch.randint(0, 2, (E,), generator=g).float()
    else:
        logits, bias = 2 * torch.randn(T, E, generator=g), 0.1 * torch.randn(E, generator=g)
    return logits, bias


@pytest.mark.parametrize("routing", ["latent_grouped", "nano", "super", "grouped_64"])
@pytest.mark.parametrize("norm", [True, False])
def test_reference_matches_transformers_router(routing, norm):
    """Same chosen experts and weights as NemotronHTopkRouter (which returns them unsorted)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    E, top_k, n_group, topk_group = ROUTINGS[routing]
    config = NemotronHConfig(**make_config("latent_grouped", n_routed_experts=E, num_experts_per_tok=top_k,
                                           n_group=n_group, topk_group=topk_group, norm_topk_prob=norm))
    router = NemotronHTopkRouter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.normal_(0, 0.1)
        logits, want_w, want_ids = router(torch.randn(16, config.hidden_size))
    weights, ids = latent_moe_route_reference(logits, router.e_score_correction_bias, top_k, n_group, topk_group,
                                              norm, config.routed_scaling_factor)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    order, want_order = ids.long().argsort(dim=1), want_ids.argsort(dim=1)
    assert torch.equal(ids.long().gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_w.gather(1, want_order))


def test_reference_order_and_tie_rule():
    """Descending biased score; with all scores equal the lowest groups and experts win."""
    logits, bias = random_logits(5, 64, seed=1)
    weights, ids = latent_moe_route_reference(logits, bias, 8, 8, 3, True, 2.5)
    biased = logits.sigmoid() + bias
    chosen = biased.gather(1, ids.long())
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.full((5,), 2.5))

    weights, ids = latent_moe_route_reference(torch.zeros(2, 64), torch.zeros(64), 12, 8, 3, False, 1.0)
    assert ids.tolist() == [list(range(12))] * 2                      # groups 0, 1 (and 2), lowest experts first
    bias = torch.zeros(64).index_fill(0, torch.tensor([9, 60]), 1)
    weights, ids = latent_moe_route_reference(torch.zeros(1, 64), bias, 4, 8, 2, False, 1.0)
    assert ids.tolist() == [[9, 60, 8, 10]]                            # groups 1 and 7 win on their top expert


@needs_triton
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_matches_reference(routing, ties):
    E, top_k, n_group, topk_group = ROUTINGS[routing]
    logits, bias = random_logits(3, E, seed=E + top_k, ties=ties)
    args = (logits, bias, top_k, n_group, topk_group, True, 2.5)
    weights, ids = latent_moe_route(*args, impl="triton")
    want_w, want_ids = latent_moe_route(*args, impl="reference")
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


@needs_triton
def test_kernel_strided_logits_without_norm():
    wide = 2 * torch.randn(4, 80, generator=torch.Generator().manual_seed(3))
    logits, bias = wide[:, 8:72], 0.1 * torch.randn(64)
    assert not logits.is_contiguous()
    args = (logits, bias, 5, 4, 2, False, 1.5)
    weights, ids = latent_moe_route(*args, impl="triton")
    want_w, want_ids = latent_moe_route(*args, impl="reference")
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


def test_bad_options_name_the_option():
    logits, bias = random_logits(2, 16, seed=0)
    with pytest.raises(ValueError, match="latent_moe_route.py: n_group=3 must divide"):
        latent_moe_route(logits, bias, 2, 3, 1, True, 1.0)
    with pytest.raises(ValueError, match="top_k=9 must be in"):
        latent_moe_route(logits, bias, 9, 4, 2, True, 1.0)
    with pytest.raises(ValueError, match="correction_bias has shape"):
        latent_moe_route(logits, bias[:8], 2, 1, 1, True, 1.0)


def test_custom_op_registration():
    logits, bias = random_logits(3, 16, seed=0)
    torch.library.opcheck(torch.ops.nemo3.latent_moe_route.default, (logits, bias, 4, 4, 2, True, 2.5, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


COMPILE_AT_REAL_SHAPES = """
import torch
from nemo3.plugins.aot import compile_launch
from nemo3.plugins.latent_moe_route_triton import _latent_moe_route_kernel, prepare

for E, top_k, n_group, topk_group in [(512, 22, 1, 1), (128, 6, 1, 1), (256, 8, 8, 4)]:  # Super, Nano, grouped
    outputs, grid, args, meta = prepare(torch.zeros(4, E), torch.zeros(E), top_k, n_group, topk_group, True, 2.5)
    assert "ptx" in compile_launch(_latent_moe_route_kernel, args, meta, capability=90).asm
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not importable: nothing to compile")
def test_kernel_compiles_for_hopper():
    """Triton's compiler (stricter than its interpreter) builds the kernel for sm_90 at Nano and Super shapes."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COMPILE_AT_REAL_SHAPES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
