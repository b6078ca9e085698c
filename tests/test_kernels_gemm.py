"""plugins/grouped_gemm.py: the reference against quant/nvfp4.py and a per-expert loop, the Triton kernel (W4A16 NVFP4
and BF16, grouped and plain) against the reference in Triton's interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, also when this file runs alone

import pytest
import torch

from nemo3.plugins.dispatch import interpreter_enabled, triton_available
from nemo3.plugins.grouped_gemm import grouped_gemm, grouped_gemm_reference, nvfp4_linear
from nemo3.quant import nvfp4

needs_triton = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                  reason="triton is not importable or TRITON_INTERPRET is off: "
                                         "the Triton kernel cannot run on CPU")


def experts(E: int, N: int, K: int, seed: int, fmt: str):
    """(weight, block_scale, global_scale, dense [E, N, K] fp32) of E random experts."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(E, N, K, generator=g) * torch.rand(E, N, 1, generator=g)  # block scales spread out
    if fmt == "bf16":
        return dense.bfloat16(), None, None, dense.bfloat16().float()
    q = [nvfp4.quantize(w) for w in dense]
    packed, scales = torch.stack([t.packed for t in q]), torch.stack([t.block_scale for t in q])
    global_scale = torch.stack([t.global_scale for t in q])
    return packed, scales, global_scale, torch.stack([t.dequantize() for t in q])


def per_expert_loop(x, dense, row_expert, relu2):
    """The oracle: each expert's rows through that expert's dequantized weight, in fp32."""
    out = torch.zeros(x.shape[0], dense.shape[1])
    for e in range(dense.shape[0]):
        rows = (row_expert == e).nonzero().flatten()
        out[rows] = x[rows].float() @ dense[e].T
    return out.relu().square() if relu2 else out


def test_reference_dequantizes_like_quant_and_equals_the_loop():
    packed, scales, gs, dense = experts(3, 24, 48, 0, "nvfp4")
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(1))
    row_expert = torch.tensor([2, 0, -1, 2, 2, 0, -1])  # expert 1 gets no rows; two padding rows
    got = grouped_gemm_reference(x, packed, scales, gs, row_expert, relu2=True)
    assert torch.allclose(got, per_expert_loop(x, dense, row_expert, True), rtol=1e-5, atol=1e-5)
    assert not got[row_expert < 0].any()
    linear = nvfp4_linear(x[None], packed[0], scales[0], gs[0], bias=torch.ones(24))
    assert torch.allclose(linear[0], x @ dense[0].T + 1, rtol=1e-5, atol=1e-5)


# (rows, N, K, experts): odd shapes, one row (decode), more rows than a tile, experts with no rows
SHAPES = [(1, 40, 48, 1), (13, 24, 80, 1), (5, 33, 64, 4), (37, 72, 112, 6), (70, 16, 32, 3)]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nvfp4", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_the_reference(shape, fmt, dtype):
    R, N, K, E = shape
    g = torch.Generator().manual_seed(R * N + K)
    weight, scales, gs, dense = experts(E, N, K, R, fmt)
    x = torch.randn(R, K, generator=g).to(dtype)
    if E == 1:
        row_expert = None
    else:  # expert 1 gets no rows; every 5th row is padding
        choices = torch.tensor([e for e in range(E) if e != 1])
        row_expert = choices[torch.randint(0, len(choices), (R,), generator=g)]
        row_expert[::5] = -1
    relu2 = E > 1
    want = grouped_gemm(x, weight, scales, gs, row_expert, relu2, impl="reference")
    got = grouped_gemm(x, weight, scales, gs, row_expert, relu2, impl="triton")
    assert got.dtype == dtype and got.shape == (R, N)
    oracle = per_expert_loop(x, dense, row_expert if row_expert is not None else torch.zeros(R, dtype=torch.long), relu2)
    # fp32: accumulation order only; 16-bit: the output's rounding (the reference also rounds before relu^2)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=2e-2 * oracle.abs().max().item())
    assert torch.allclose(got.float(), want.float(), **tol)
    assert torch.allclose(got.float(), oracle, **tol)
    if row_expert is not None:
        assert not got[row_expert < 0].any()  # padding rows stay zero


def test_bad_inputs_are_one_line_errors():
    packed, scales, gs, _ = experts(2, 8, 32, 0, "nvfp4")
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="row_expert"):
        grouped_gemm(x, packed, scales, gs)
    with pytest.raises(ValueError, match="block_scale"):
        grouped_gemm(x, packed, scales[:, :, :1], gs, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="does not take inputs"):
        grouped_gemm(torch.randn(3, 48), packed, scales, gs, torch.zeros(3, dtype=torch.long))
