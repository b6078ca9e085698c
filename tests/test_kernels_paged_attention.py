"""plugins/paged_attention.py: the reference and the Triton kernel (Triton's interpreter) over scattered pages
equal dense causal attention (engines/network/attention.py's `attend`) at random lengths across page
boundaries, for decode, verify and prefill-chunk shapes, GQA and FP8 pages."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, also when this file runs alone

import pytest
import torch

from nemo3.engines.network.attention import attend
from nemo3.plugins.dispatch import interpreter_enabled, triton_available
from nemo3.plugins.paged_attention import FP8, paged_attention

needs_triton = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                  reason="triton is not importable or TRITON_INTERPRET is off: "
                                         "the Triton kernel cannot run on CPU")


def make_case(lens, T, H, KV, Dh, page_size, fp8=False, width=None, seed=0):
    """(paged inputs, dense oracle output). Row b's keys are scattered over random pages of a shared pool."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lens), max(max(lens), 1)
    k, v = torch.randn(B, L, KV, Dh, generator=g), torch.randn(B, L, KV, Dh, generator=g)
    q = torch.randn(B, T, H, Dh, generator=g)
    need = [-(-n // page_size) for n in lens]
    width = width or max(max(need), 1)
    num_pages = sum(need) + 3
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((B, width), -1, dtype=torch.int32)
    k_pages = torch.zeros(num_pages, page_size, KV, Dh)
    v_pages = torch.zeros_like(k_pages)
    scales = {}
    if fp8:  # what an FP8 cache holds: K / k_scale in float8, read back times k_scale
        scales = dict(k_scale=k.abs().amax() / 448, v_scale=v.abs().amax() / 448)
        k = (k / scales["k_scale"]).to(FP8).float() * scales["k_scale"]
        v = (v / scales["v_scale"]).to(FP8).float() * scales["v_scale"]
    for b, n in enumerate(lens):
        for j in range(need[b]):
            page = order.pop()
            table[b, j] = page
            chunk = slice(j * page_size, min(n, (j + 1) * page_size))
            k_pages[page, :chunk.stop - chunk.start] = k[b, chunk]
            v_pages[page, :chunk.stop - chunk.start] = v[b, chunk]
    if fp8:
        k_pages = (k_pages / scales["k_scale"]).to(FP8)
        v_pages = (v_pages / scales["v_scale"]).to(FP8)
    seq_lens = torch.tensor(lens)
    scale = Dh ** -0.5
    expected = attend(q, k, v, (seq_lens - T).clamp(min=0), scale)
    expected[seq_lens == 0] = 0
    inputs = dict(q=q, k_pages=k_pages, v_pages=v_pages, block_table=table, seq_lens=seq_lens, scale=scale, **scales)
    return inputs, expected


CASES = [  # lens, T, H, KV, Dh, page_size
    ([1, 16, 17, 31, 32, 33, 70], 1, 4, 2, 32, 16),  # decode across page boundaries
    ([5, 48, 64, 100], 3, 8, 2, 32, 16),  # a verify of 3 tokens, GQA 4 query heads per KV head
    ([40, 130, 64], 37, 4, 1, 24, 16),  # a prefill chunk: rows of T*G > BLOCK_M, head_dim not a power of two
    ([0, 9, 200], 1, 6, 3, 16, 32),  # a padding row (length 0), non-power-of-two heads
    (torch.randint(2, 300, (6,), generator=torch.Generator().manual_seed(5)).tolist(), 2, 4, 2, 32, 16),  # random
    ([2, 1024, 1025, 2300], 2, 4, 2, 16, 128),  # long rows: the reference's online softmax over several splits
    ([0, 3, 16], 2, 4, 2, 16, 16),  # a one-page table: one split, the kernel writes the normalized output itself
]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_reference_equals_dense_attention(case, fp8):
    inputs, expected = make_case(*case, fp8=fp8, width=20)
    got = paged_attention(**inputs, impl="reference")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a static bound on the pages read (a compiled step's) gives the same result as the lengths' own bound
    bound = -(-max(case[0]) // case[5])
    torch.testing.assert_close(paged_attention(**inputs, max_pages=bound + 2, impl="reference"), got)


@needs_triton
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_equals_dense_attention(case, fp8):
    inputs, expected = make_case(*case, fp8=fp8, seed=1)  # a block table as wide as the longest row: 3 splits
    got = paged_attention(**inputs, impl="triton")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bad_inputs_name_the_tensor():
    inputs, _ = make_case([4, 8], 1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(**dict(inputs, block_table=inputs["block_table"][:1]), impl="reference")
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        paged_attention(**dict(inputs, k_pages=inputs["k_pages"].to(FP8), v_pages=inputs["v_pages"].to(FP8)),
                        impl="reference")
