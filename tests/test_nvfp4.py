"""NVFP4 numerics against ModelOpt 0.47: `NVFP4QTensor`, the HF export, and its fake-quant kernel's JIT functions."""

from __future__ import annotations

import copy

import pytest
import torch

from nemo3.quant import nvfp4

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.qtensor import NVFP4QTensor  # noqa: E402


def modelopt_quantize(x, global_scale=None, block_scale=None):
    q, scale, scale_2 = NVFP4QTensor.quantize(x, 16, block_scale, global_scale)
    return q._quantized_data, scale, scale_2


def assert_same_as_modelopt(ours: nvfp4.NVFP4Tensor, theirs) -> None:
    packed, block_scale, global_scale = theirs
    assert ours.packed.dtype == torch.uint8 and ours.block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.block_scale.view(torch.uint8), block_scale.view(torch.uint8))
    assert ours.global_scale.dtype == torch.float32
    assert torch.equal(ours.global_scale, global_scale.reshape(()))


def spread(*shape, seed=0, dtype=torch.float32):
    """Random values whose 16-blocks span many magnitudes, so block scales cover the E4M3 range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    block_gain = torch.exp2(torch.randint(-20, 3, (*shape[:-1], shape[-1] // 16, 1), generator=g).float())
    return (x.reshape(*shape[:-1], -1, 16) * block_gain).reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (3, 24, 48)])
def test_quantize_bit_identical_to_nvfp4qtensor(dtype, shape):
    for seed in range(3):
        x = spread(*shape, seed=seed, dtype=dtype)
        assert_same_as_modelopt(nvfp4.quantize(x), modelopt_quantize(x))


def test_quantize_plain_gaussian_weight():
    x = torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    ours = nvfp4.quantize(x, name="w")
    assert_same_as_modelopt(ours, modelopt_quantize(x))
    assert ours.packed.shape == (96, 128) and ours.block_scale.shape == (96, 16)
    assert torch.equal(ours.global_scale, x.abs().amax() / 2688.0)


def test_block_of_equal_values_and_zero_block():
    x = torch.full((4, 64), 0.3)
    x[1, 16:32] = -0.3
    x[2, 32:48] = 0.0  # an all-zero block inside a non-zero tensor gets block scale 1.0
    ours = nvfp4.quantize(x)
    assert_same_as_modelopt(ours, modelopt_quantize(x))
    assert ours.block_scale[2, 2].float() == 1.0
    assert torch.equal(nvfp4.unpack(ours.packed)[0, :16], torch.full((16,), 7, dtype=torch.uint8))  # 6.0


def test_ties_round_to_even_and_saturate():
    # global scale 2**-8 and block scale 256 make the step exactly 1, so the values below are exact ties
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 0.2, 0.3, 5.5, 0.0, -0.0, 0.1, 6.0])
    x = torch.stack([ties, -ties])
    g = torch.tensor(2.0**-8)
    bs = torch.full((2, 1), 256.0).to(torch.float8_e4m3fn)
    ours = nvfp4.quantize(x, global_scale=g, block_scale=bs)
    assert_same_as_modelopt(ours, modelopt_quantize(x, g, bs))
    expected = torch.tensor([0, 1, 1, 2, 2, 4, 4, 6, 6, 0.0, 0.5, 6, 0, 0, 0, 6])
    assert torch.equal(ours.dequantize()[0], expected)
    assert torch.equal(ours.dequantize()[1], -expected)


def test_values_beyond_six_block_scales_saturate():
    # a global scale below amax / 2688 (a calibrated amax smaller than this weight's) saturates the block scale at 448
    x = spread(8, 64, seed=3)
    g = nvfp4.global_scale_from_amax(x.abs().amax() / 4)
    ours = nvfp4.quantize(x, global_scale=g)
    assert_same_as_modelopt(ours, modelopt_quantize(x, g))
    assert ours.block_scale.float().max() == 448.0
    assert (nvfp4.unpack(ours.packed) & 7).max() == 7


def test_tiny_values_and_subnormal_block_scales():
    # block amaxes from 1 down to 1e-12: E4M3 normal, subnormal and below-2**-9 (clamped) block scales
    gains = torch.logspace(0, -12, 32)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7)) * gains[:, None]
    x = x.reshape(4, 128)
    ours = nvfp4.quantize(x)
    assert_same_as_modelopt(ours, modelopt_quantize(x))
    scales = ours.block_scale.float()
    assert scales.min() == 2.0**-9 and (scales < 2.0**-6).any()  # clamped floor and subnormals both occur


def test_dequantize_matches_modelopt_and_round_trips():
    x = spread(16, 64, seed=11)
    ours = nvfp4.quantize(x)
    q, block_scale, global_scale = NVFP4QTensor.quantize(x, 16)
    theirs = q.dequantize(scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    assert torch.equal(ours.dequantize(), theirs)
    codes = nvfp4.unpack(ours.packed)
    assert torch.equal(nvfp4.pack(codes), ours.packed)
    assert torch.equal(codes[:, 0], ours.packed[:, 0] & 0x0F)  # even index in the low nibble
    assert torch.equal(codes[:, 1], ours.packed[:, 0] >> 4)
    assert ours.dequantize(torch.bfloat16).dtype == torch.bfloat16
    # re-quantizing the dequantized tensor with the same scales is exact (up to the sign of zero codes)
    again = nvfp4.quantize(ours.dequantize(), ours.global_scale, ours.block_scale)
    assert torch.equal(again.packed & 0x77, ours.packed & 0x77) and torch.equal(again.dequantize(), ours.dequantize())


def test_all_zeros_encode_as_zeros():
    x = torch.zeros(4, 32)
    ours = nvfp4.quantize(x, name="zero_weight")
    assert torch.equal(ours.packed, torch.zeros(4, 16, dtype=torch.uint8))
    assert torch.equal(ours.block_scale.float(), torch.ones(4, 2))
    assert ours.global_scale == 0 and torch.equal(ours.dequantize(), x)
    # ModelOpt 0.47 divides 0 by 0 here: NaN block scales (the reason for our own rule)
    assert modelopt_quantize(x)[1].float().isnan().all()


def test_short_last_block_is_an_error_like_modelopt_export():
    x = torch.randn(8, 24)
    with pytest.raises(ValueError, match="layers.1.mixer.shared_experts.down_proj.weight.*multiple of"):
        nvfp4.quantize(x, name="layers.1.mixer.shared_experts.down_proj.weight")
    with pytest.raises(AssertionError, match="not divisible"):
        NVFP4QTensor.get_weights_scaling_factor(x, 16)  # what ModelOpt's export calls
    with pytest.raises(ValueError, match="act"):
        nvfp4.fake_quantize(x, torch.tensor(0.01), name="act")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_an_error_naming_it(bad):
    x = torch.randn(4, 32)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight: contains NaN or Inf"):
        nvfp4.quantize(x, name="backbone.layers.1.mixer.experts.3.up_proj.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_bit_identical(dtype):
    """What `export_hf_checkpoint` writes for an NVFP4 linear: weight, weight_scale, weight_scale_2, input_scale."""
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(spread(48, 64, seed=2))
    weight = model[0].weight.detach().clone()
    batches = [torch.randn(5, 64, dtype=dtype) * 3 for _ in range(3)]
    mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), lambda m: [m(b) for b in batches])
    input_amax = model[0].input_quantizer.amax.clone()
    _export_quantized_weight(model[0], dtype)

    ours = nvfp4.quantize(weight)
    assert torch.equal(ours.packed, model[0].weight)
    assert torch.equal(ours.block_scale.view(torch.uint8), model[0].weight_scale.view(torch.uint8))
    assert torch.equal(ours.global_scale, model[0].weight_scale_2)
    assert torch.equal(input_amax.float().reshape(()), torch.stack([b.abs().amax() for b in batches]).max().float())
    assert torch.equal(nvfp4.global_scale_from_amax(input_amax), model[0].input_scale)


triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from modelopt.torch.kernels.quantization.common.nvfp4_quant import fp4_round_magnitude  # noqa: E402


@triton.jit
def _modelopt_fp4_fake_quant_block(x_ptr, scale_ptr, y_ptr, BLOCK: tl.constexpr):
    """The body of ModelOpt's `fp4_fake_quant_kernel` after its block scale, one 16-block per program,
    rounding with ModelOpt's own `fp4_round_magnitude`. (The kernel as shipped uses block pointers,
    which Triton 3.9 removed.)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    scale = tl.load(scale_ptr + tl.program_id(0))
    scale = tl.where(scale >= 1e-5, scale, 1.0)
    magnitude = tl.abs(x)
    rounded = fp4_round_magnitude(magnitude / scale) * scale
    tl.store(y_ptr + offs, tl.where(x >= 0, rounded, -rounded))


def modelopt_fake_quant(x, global_scale):
    """ModelOpt's dynamic NVFP4 fake-quant of fp32 `x` [M, K].

    The block scale is ModelOpt's `fp8_quantize_scale`, `e4m3(min(block_amax / (6 g), 448)) * g`,
    computed here in torch: the interpreter's float8e4nv cast is wrong (31.4 -> 24, ties up), while
    torch's cast rounds to nearest even like the GPU's cvt.rn.satfinite.
    """
    g = global_scale.float()
    block_amax = x.reshape(-1, 16).abs().amax(-1)
    scale = (block_amax / (6.0 * g)).clamp(max=448.0).to(torch.float8_e4m3fn).float() * g
    y = torch.empty_like(x)
    _modelopt_fp4_fake_quant_block[(x.numel() // 16,)](x.contiguous(), scale.contiguous(), y, BLOCK=16)
    return y


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_fake_quant_matches_modelopt_kernel(dtype):
    g = torch.Generator().manual_seed(4)
    gains = torch.exp2(torch.randint(-4, 2, (4, 4, 1), generator=g).float())
    x = (torch.randn(4, 4, 16, generator=g) * gains).reshape(4, 64)
    input_scale = torch.tensor(2.0**-8)  # calibrated amax 6 * 448 / 256 = 10.5
    x[0, :16] = 0.0  # zero block
    x[1, :16] *= 1e-4  # a subnormal E4M3 block scale
    x[1, 16:32] *= 1e-7  # a block whose scale falls below 1e-5: flushed to zero
    ties = torch.tensor([0.25, -0.75, 1.25, -1.75, 2.5, 3.5, 5.0, 0.0, -0.0, 6.0, 1, 2, 3, 4, 5, 6])
    x[2, 32:48] = ties  # block scale exactly 256, step exactly 1: every value a tie or on the grid
    x[3, :] *= 8  # beyond the calibrated amax: block scales and values saturate
    x = x.to(dtype)
    ours = nvfp4.fake_quantize(x, input_scale)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert torch.equal(ours, modelopt_fake_quant(x.float(), input_scale).to(dtype))
    assert (ours[1, 16:32] == 0).all() and (ours[0, :16] == 0).all()
    expected = torch.tensor([0.0, -1, 1, -2, 2, 4, 4, 0, 0, 6, 1, 2, 3, 4, 4, 6])
    assert torch.equal(ours[2, 32:48].float(), expected)
    assert ours[3].abs().max() == 6 * 448 / 256


@triton.jit
def _modelopt_static_fp4_block(x_ptr, scale_ptr, y_ptr, BLOCK: tl.constexpr):
    """ModelOpt's `static_blockwise_fp4_fake_quant_kernel`: its `nvfp4_scalar_quant` on one block per program,
    rounding with ModelOpt's `fp4_round_magnitude` (the NaN/inf guard written without libdevice, which the
    interpreter lacks)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    scale = tl.load(scale_ptr + tl.program_id(0)).to(tl.float32)
    zero = scale == 0.0
    safe = tl.where(zero | (scale != scale) | (tl.abs(scale) == float("inf")), 1.0, scale)
    rescaled = fp4_round_magnitude(tl.abs(x) / safe) * safe
    tl.store(y_ptr + offs, tl.where(zero, 0.0, tl.where(x >= 0, rescaled, -rescaled)))


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
@pytest.mark.parametrize("fp8_max", [448.0, 256.0])  # ModelOpt's default, and four-over-six's normalization
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_fake_quant_matches_modelopts_kernel(dtype, fp8_max):
    """quant/modelopt_cpu.py, which MSE calibration uses on CPU, against ModelOpt's static-block kernel (in the
    interpreter) fed ModelOpt's own `compute_fp4_scales`."""
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel import compute_fp4_scales

    from nemo3.quant.modelopt_cpu import static_fake_quantize

    x = spread(6, 64, seed=5).to(dtype)
    x[0, :16] = 0.0  # a zero block: zero amax, zero scale
    x[1, :16] = torch.tensor([0.25, -0.75, 1.25, -1.75, 2.5, 3.5, 5.0, 0.0, -0.0, 6.0, 1, 2, 3, 4, 5, 6]) * 1.5 / 6
    block_amax = x.float().reshape(-1, 16).abs().amax(-1)
    amax = block_amax * torch.tensor([1.0, 1.5]).repeat(block_amax.numel() // 2)  # four-over-six picks M=4 (x1.5)
    amax[4] = 1.5  # the tie block: every value on the grid or a tie
    ours = static_fake_quantize(x, amax, amax.max(), True, fp8_max, dtype)
    scale = compute_fp4_scales(amax, amax.max(), True, fp8_max)
    theirs = torch.empty(x.numel())
    _modelopt_static_fp4_block[(amax.numel(),)](x.float().contiguous().view(-1), scale.contiguous(), theirs, BLOCK=16)
    assert ours.dtype == dtype and torch.equal(ours, theirs.view(x.shape).to(dtype))
    assert (ours[0, :16] == 0).all() and not torch.equal(ours, x)
