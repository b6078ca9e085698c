"""Weight-only quantized and grouped GEMMs: the NVFP4 W4A16 linear layer and the routed experts' GEMMs.

    out[r] = act(x[r] @ W_{e(r)}^T)        act = relu(.)^2 (the experts' up projection) or identity

x [R, K] (bf16/fp16/fp32). W is one weight per expert, E experts (a linear layer is E = 1):

* BF16: `weight` [E, N, K] in any float dtype;
* NVFP4 (W4A16): `weight` uint8 [E, N, K/2] E2M1 codes, two per byte (element 2j in the low nibble),
  `block_scale` float8_e4m3fn [E, N, K/16], `global_scale` fp32 [E]; W = E2M1 * block_scale * global_scale
  (the layout of quant/nvfp4.py, which decodes through `dequantize_nvfp4` below).

`row_expert` int [R] gives each row's expert (the (token, expert) pairs of a MoE layer); None: expert 0 for
every row. A row of expert -1 (padding) gives zeros.

The Triton kernel (grouped_gemm_triton.py) keeps NVFP4 weights packed in memory, decodes them in registers
and multiplies on the tensor cores: the NVFP4 path of Hopper, which has no FP4 tensor cores. The reference
dequantizes the weights and gathers one weight per row (static shapes, no host reads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import eager_reference, use_triton

WHERE = "plugins/grouped_gemm.py"
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # by code & 7; codes 8..15 are the negatives
NVFP4_BLOCK = 16


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor | float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 [..., K/2], block_scale E4M3 [..., K/16], global_scale fp32 (0-dim, or one per leading index
    of packed, e.g. [E] for [E, N, K/2]) -> [..., K] in `dtype`: the product in fp32, rounded once."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    codes = codes.long()
    values = torch.tensor(E2M1_VALUES, device=packed.device)[codes & 7]
    values = torch.where(codes >= 8, -values, values)
    g = torch.as_tensor(global_scale, device=packed.device).float()
    g = g.reshape(*g.shape, *[1] * (block_scale.dim() - g.dim()))
    step = (block_scale.float() * g).unsqueeze(-1)
    out = values.reshape(*codes.shape[:-1], -1, NVFP4_BLOCK) * step
    return out.reshape(codes.shape).to(dtype)


def grouped_gemm_reference(x, weight, block_scale, global_scale, row_expert, relu2):
    """Plain-torch specification (module docstring): [R, N] in x's dtype."""
    w = weight.to(x.dtype) if block_scale is None else dequantize_nvfp4(weight, block_scale, global_scale, x.dtype)
    if row_expert is None:
        y = F.linear(x, w[0])
    else:
        y = torch.bmm(w[row_expert.clamp(min=0).long()], x[:, :, None]).squeeze(-1)
        y = torch.where(row_expert[:, None] >= 0, y, torch.zeros_like(y))
    return F.relu(y).square() if relu2 else y


def _check(x, weight, block_scale, global_scale, row_expert):
    if x.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"{WHERE}: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}, expected "
                         "[rows, K] and [experts, N, K (K/2 packed)]")
    E, N, Kw = weight.shape
    K = x.shape[1]
    if block_scale is None:
        if Kw != K:
            raise ValueError(f"{WHERE}: weight {tuple(weight.shape)} does not take inputs of {K} features")
    else:
        if weight.dtype != torch.uint8 or Kw * 2 != K or K % NVFP4_BLOCK:
            raise ValueError(f"{WHERE}: NVFP4 weight {weight.dtype} {tuple(weight.shape)} does not take inputs of "
                             f"{K} features (uint8 [E, N, K/2], K a multiple of {NVFP4_BLOCK})")
        if tuple(block_scale.shape) != (E, N, K // NVFP4_BLOCK) or block_scale.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{WHERE}: block_scale {block_scale.dtype} {tuple(block_scale.shape)}, expected "
                             f"float8_e4m3fn [{E}, {N}, {K // NVFP4_BLOCK}]")
        if global_scale is None or tuple(global_scale.shape) != (E,):
            raise ValueError(f"{WHERE}: global_scale must be fp32 [{E}] (one per expert)")
    if row_expert is None and E != 1:
        raise ValueError(f"{WHERE}: {E} experts need row_expert (each row's expert)")
    if row_expert is not None and tuple(row_expert.shape) != (x.shape[0],):
        raise ValueError(f"{WHERE}: row_expert has shape {tuple(row_expert.shape)}, expected [{x.shape[0]}]")


@torch.library.custom_op("nemo3::grouped_gemm", mutates_args=())
def _grouped_gemm_op(x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor | None,
                     global_scale: torch.Tensor | None, row_expert: torch.Tensor | None, relu2: bool,
                     impl: str) -> torch.Tensor:
    if use_triton(impl, x.device, WHERE):
        from .grouped_gemm_triton import launch
        out = x.new_zeros(x.shape[0], weight.shape[1])
        return launch(x.contiguous(), weight, block_scale, global_scale, row_expert, relu2, out)
    return grouped_gemm_reference(x, weight, block_scale, global_scale, row_expert, relu2)


@_grouped_gemm_op.register_fake
def _(x, weight, block_scale, global_scale, row_expert, relu2, impl):
    return x.new_empty(x.shape[0], weight.shape[1])


def grouped_gemm(x, weight, block_scale=None, global_scale=None, row_expert=None, relu2=False, *, impl=None):
    """The GEMM of the module docstring through the `nemo3::grouped_gemm` op: x [R, K] -> [R, N].
    `impl`: "auto" | "triton" | "reference" (default: $NEMO3_KERNEL_IMPL or "auto", see plugins/dispatch.py)."""
    _check(x, weight, block_scale, global_scale, row_expert)
    if eager_reference(impl, x.device, WHERE):
        return grouped_gemm_reference(x, weight, block_scale, global_scale, row_expert, bool(relu2))
    return _grouped_gemm_op(x, weight, block_scale, global_scale, row_expert, bool(relu2), impl or "")


def nvfp4_linear(x, packed, block_scale, global_scale, bias=None, *, impl=None):
    """W4A16 linear layer: x [..., K] @ W^T (+ bias) with W NVFP4 (packed [N, K/2], block_scale [N, K/16],
    global_scale 0-dim), in x's dtype; on CUDA the weight stays packed (the Triton kernel)."""
    y = grouped_gemm(x.reshape(-1, x.shape[-1]), packed[None], block_scale[None], global_scale.reshape(1),
                     impl=impl)
    y = y.reshape(*x.shape[:-1], packed.shape[0])
    return y if bias is None else y + bias.to(y.dtype)
