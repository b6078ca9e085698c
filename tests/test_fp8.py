"""FP8 per-tensor numerics against ModelOpt 0.47: `FP8QTensor`, the HF export (weights, input and KV scales)."""

from __future__ import annotations

import copy

import pytest
import torch

from nemo3.quant import fp8

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.qtensor import FP8QTensor  # noqa: E402


def wide(*shape, seed=0, dtype=torch.float32):
    """Random values over many magnitudes, so E4M3 normals, subnormals and underflow all occur."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-14, 3, shape, generator=g).float())).to(dtype)


def bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_bit_identical_to_fp8qtensor(dtype):
    for seed in range(3):
        x = wide(64, 96, seed=seed, dtype=dtype)
        q, scale = fp8.quantize_weight(x, name="w")
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.dim() == 0
        assert torch.equal(scale, x.abs().amax().float() / 448.0)
        theirs, their_scale = FP8QTensor.quantize(x, scale)
        assert torch.equal(bits(q), bits(theirs._quantized_data))
        # ModelOpt dequantizes in the target dtype (scale rounded to bf16 first); ours multiplies in fp32
        assert torch.equal(fp8.dequantize(q, scale), theirs.dequantize(torch.float32, scale=their_scale))
        assert (q.float().abs() < 2.0**-6).any() and q.float().abs().max() == 448.0  # subnormals and the top code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_bit_identical(dtype):
    """What `export_hf_checkpoint` writes for an FP8 linear: weight, weight_scale, input_scale."""
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    model = torch.nn.Sequential(torch.nn.Linear(96, 40, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(wide(40, 96, seed=5))
    weight = model[0].weight.detach().clone()
    batches = [wide(6, 96, seed=10 + i, dtype=dtype) for i in range(3)]
    mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), lambda m: [m(b) for b in batches])
    input_amax = model[0].input_quantizer.amax.clone()
    _export_quantized_weight(model[0], dtype)

    q, scale = fp8.quantize_weight(weight)
    assert torch.equal(bits(q), bits(model[0].weight))
    assert torch.equal(scale, model[0].weight_scale)
    assert torch.equal(fp8.scale_from_amax(input_amax), model[0].input_scale)


def test_kv_cache_scales_match_export():
    """k_scale / v_scale = calibrated K/V amax / 448, unclamped, as the unified HF export writes them."""
    from modelopt.torch.export.quant_utils import postprocess_state_dict

    amax = {"k": torch.tensor(3.7), "v": torch.tensor(0.021)}
    state = {f"model.layers.2.mixer.{kv}_bmm_quantizer._amax": a for kv, a in amax.items()}
    exported = postprocess_state_dict(state, 448, "FP8")
    assert torch.equal(exported["model.layers.2.mixer.k_proj.k_scale"], fp8.scale_from_amax(amax["k"]))
    assert torch.equal(exported["model.layers.2.mixer.v_proj.v_scale"], fp8.scale_from_amax(amax["v"]))


def test_activations_saturate_and_fake_quantize():
    scale = fp8.scale_from_amax(torch.tensor(4.0))
    x = torch.tensor([-100.0, -4.0, -1e-9, 0.0, 1.0, 3.99, 4.0, 4.1, 1e6], dtype=torch.bfloat16)
    q = fp8.quantize(x, scale)
    assert q.float()[[0, 1, 6, 7, 8]].tolist() == [-448.0, -448.0, 448.0, 448.0, 448.0]
    y = fp8.fake_quantize(x, scale)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (q.float() * scale).to(torch.bfloat16))
    assert y[4] == 1.0 and y[3] == 0 and y[2] == 0


def test_all_zeros_and_non_finite():
    q, scale = fp8.quantize_weight(torch.zeros(3, 8))
    assert scale == 0 and torch.equal(q.float(), torch.zeros(3, 8))
    theirs, _ = FP8QTensor.quantize(torch.zeros(3, 8), torch.tensor(0.0))
    assert theirs._quantized_data.float().isnan().all()  # ModelOpt 0.47 divides 0 by 0 (the reason for our rule)
    for bad in (float("nan"), float("inf")):
        w = torch.ones(3, 8)
        w[1, 1] = bad
        with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.in_proj\.weight: contains NaN or Inf"):
            fp8.quantize_weight(w, name="backbone.layers.0.mixer.in_proj.weight")
