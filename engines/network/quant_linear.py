"""QuantLinear: a linear layer held as a ModelOpt unified checkpoint stores it, run with fake quantization.

Its state dict has the checkpoint's names (quant/layout.py), so a quantized checkpoint loads with
`load_state_dict(strict=True)`:

    weight           NVFP4 codes uint8 [out, in/2] | FP8 float8_e4m3fn [out, in] | float [out, in] (bf16)
    weight_scale     NVFP4 E4M3 block scales [out, in/16] | FP8 fp32 scalar
    weight_scale_2   NVFP4 fp32 global scale
    input_scale      fp32 activation scale (W4A4 / W8A8 layers)
    k_scale/v_scale  fp32 FP8 KV-cache scale (attention k_proj / v_proj)
    bias             when the layer has one

forward, x [..., in] -> [..., out]:

    x = nvfp4.fake_quantize(x, input_scale)  or  fp8.fake_quantize(x, input_scale)   (if input_scale, unless the
                                                                                      caller quantized x already)
    y = x @ W^T + bias, W the dequantized weight                                      (cached by `prepare`)
    y = fp8.fake_quantize(y, k_scale or v_scale)                                      (K/V: what an FP8 cache holds)

The packed weight and its scales stay in the module as buffers for the GPU GEMM kernels; the
dequantized copy is a non-persistent buffer computed once at load (`prepare`), for CPU and
reference execution. (Converting the model with `.to(dtype)` would convert the float8 weight and
the fp32 scales too: choose the dtype at load time instead.) `prepare` also reads the input scale into a Python
number, which a compiled step folds into its code: a tensor would be one more input for it to take on every call
(an fp8 build's decode step took 36 of them), and a zero scale one more select per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...export.checkpoint import Checkpoint
from ...plugins.dispatch import functional_mode, use_triton
from ...plugins.fp8_linear import fp8_linear
from ...plugins.grouped_gemm import nvfp4_linear
from ...quant import fp8, nvfp4, qdq_ops
from ...quant.layout import BF16, FP8, NVFP4, LinearLayout, linear_layouts
from .parallel import Parallel, VocabHead


class QuantLinear(nn.Module):
    """x [..., in_features] -> [..., out_features]; see the module docstring."""

    def __init__(self, layout: LinearLayout, bias: bool = False):
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.in_features, layout.out_features
        rows, cols = layout.out_features, layout.in_features
        if layout.weight_format == BF16:
            self.weight = nn.Parameter(torch.empty(rows, cols))
        elif layout.weight_format == NVFP4:
            self.register_buffer("weight", torch.empty(rows, cols // 2, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.empty(rows, cols // nvfp4.BLOCK, dtype=torch.float8_e4m3fn))
            self.register_buffer("weight_scale_2", torch.empty((), dtype=torch.float32))
        elif layout.weight_format == FP8:
            self.register_buffer("weight", torch.empty(rows, cols, dtype=torch.float8_e4m3fn))
            self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32))
        else:
            raise ValueError(f"{layout.layer}: unknown weight format {layout.weight_format!r}")
        if layout.input_scale:
            self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))
        if layout.output_scale:
            self.register_buffer(layout.output_scale, torch.empty((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None
        self.register_buffer("dequantized", None, persistent=False)
        self.static_input_scale: float | None = None  # input_scale's value, read by `prepare`

    def dequantize_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`, decoded from its stored form."""
        fmt = self.layout.weight_format
        if fmt == NVFP4:
            return nvfp4.dequantize(self.weight, self.weight_scale, self.weight_scale_2, dtype)
        if fmt == FP8:
            return fp8.dequantize(self.weight, self.weight_scale, dtype)
        return self.weight.to(dtype)

    @property
    def runs_packed(self) -> bool:
        """Whether the GEMM reads the stored weight itself, with no dequantized copy: NVFP4 through the W4A16
        kernel where the Triton kernels run (CUDA; the interpreter in tests), FP8 W8A8 through torch._scaled_mm
        on CUDA. Elsewhere the layer multiplies by the weight dequantized once at load."""
        fmt = self.layout.weight_format
        if fmt == NVFP4:
            return use_triton(None, self.weight.device, "engines/network/quant_linear.py")
        return fmt == FP8 and self.layout.input_scale and self.weight.is_cuda

    def prepare(self, dtype: torch.dtype) -> None:
        """Decode the weight once into the cached `dequantized` buffer (quantized formats the GEMM does not
        read packed), and read the input scale into `static_input_scale` (after the scales were loaded)."""
        if self.layout.weight_format != BF16 and not self.runs_packed:
            self.dequantized = self.dequantize_weight(dtype)
        if self.layout.input_scale:
            self.static_input_scale = float(self.input_scale)

    def input_quantizer(self) -> tuple[str, torch.Tensor | float] | None:
        """(format, scale) with which this layer quantizes its input (W4A4, W8A8), else None. Traced for a compiled
        step or an ahead-of-time engine, the scale is `static_input_scale` (once prepared); eagerly, and in an ONNX
        export (whose quantization nodes take it as an initializer), the `input_scale` tensor."""
        if not self.layout.input_scale:
            return None
        static = self.static_input_scale is not None and torch.compiler.is_compiling() and not functional_mode()
        return self.layout.weight_format, self.static_input_scale if static else self.input_scale

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as this layer's GEMM sees it: fake-quantized with its input quantizer, if it has one."""
        quantizer = self.input_quantizer()
        return x if quantizer is None else fake_quantize_input(*quantizer, x)

    def forward(self, x: torch.Tensor, input_quantized: bool = False) -> torch.Tensor:
        """`input_quantized`: x is already what `quantize_input` makes of it (layers that share one input quantizer
        quantize it once: attention.py)."""
        fmt = self.layout.weight_format
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if fmt == FP8 and self.layout.input_scale and self.dequantized is None and x.is_cuda:  # real W8A8
            y = fp8_linear(fp8.quantize(x, self.input_scale), self.input_scale, self.weight, self.weight_scale,
                           bias, x.dtype)
            return self._output(y)
        if not input_quantized:
            x = self.quantize_input(x)
        if fmt == NVFP4 and self.dequantized is None and self.runs_packed:  # W4A16 kernel, weight kept packed
            return self._output(nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, bias))
        if fmt == BF16:
            weight = self.weight
        elif functional_mode():  # an ONNX export: the weight stays quantized, dequantized by a node
            weight = (qdq_ops.nvfp4_dequantize_weight(self.weight, self.weight_scale, self.weight_scale_2)
                      if fmt == NVFP4 else qdq_ops.fp8_dequantize_weight(self.weight, self.weight_scale))
        else:
            weight = self.dequantized if self.dequantized is not None else self.dequantize_weight(x.dtype)
        return self._output(F.linear(x, weight.to(x.dtype), bias))

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """K/V projections: the output as the FP8 cache holds it."""
        if self.layout.output_scale:
            fake_quantize = qdq_ops.fp8_qdq if functional_mode() else fp8.fake_quantize
            y = fake_quantize(y, getattr(self, self.layout.output_scale))
        return y

    def extra_repr(self) -> str:
        act = "" if not self.layout.input_scale else f", activations {self.layout.weight_format}"
        kv = f", output {self.layout.output_scale}" if self.layout.output_scale else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight {self.layout.weight_format}{act}{kv}, bias={self.bias is not None}")


class QuantVocabHead(QuantLinear):
    """A quantized lm_head holding this rank's vocabulary rows: its logits are all-gathered, as VocabHead's."""

    def __init__(self, layout: LinearLayout, parallel: Parallel):
        super().__init__(layout)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather(super().forward(x))


def fake_quantize_input(weight_format: str, input_scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A W4A4 (nvfp4) or W8A8 (fp8) layer's input as its GEMM sees it: quantized and dequantized with
    `input_scale` (one scalar, a Python number or a 0-dim tensor, or one per row of x). Branch-free: runs inside
    compiled graphs. In an ONNX export (plugins/dispatch.functional_ops) the quantization nodes' ops
    (quant/qdq_ops.py)."""
    if functional_mode():
        return (qdq_ops.nvfp4_qdq if weight_format == NVFP4 else qdq_ops.fp8_qdq)(x, input_scale)
    if weight_format == NVFP4:
        return nvfp4.fake_quantize(x, input_scale)
    return fp8.fake_quantize(x, input_scale)


def shared_input_quantizer(layers: tuple[nn.Module, ...]) -> tuple[str, torch.Tensor | float] | None:
    """The input quantizer of `layers` that all read one input (attention's q, k, v projections) when they quantize
    it alike (one format and one scale: ModelOpt calibrates each on that same input, so their scales agree), else
    None. Such an input is quantized once for all of them."""
    if not all(isinstance(layer, QuantLinear) and layer.static_input_scale is not None for layer in layers):
        return None
    if len({(layer.layout.weight_format, layer.static_input_scale) for layer in layers}) != 1:
        return None
    return layers[0].input_quantizer()


def install_quant_linears(model: nn.Module, ckpt: Checkpoint, expected: dict[str, tuple[int, ...]] | None = None
                          ) -> set[str]:
    """Replace each nn.Linear of `model` that `ckpt` stores quantized (or with K/V scales) by a QuantLinear.

    `expected`: the logical shapes of `ckpt`'s tensors when it is a tensor-parallel rank's part of the model
    (quant/layout.py's linear_layouts). Returns the state-dict names of the quantization tensors, which load
    in their stored dtype.
    """
    stored_as_is = set()
    for layer, layout in linear_layouts(ckpt, expected).items():
        parent_name, _, child = layer.rpartition(".")
        try:
            old = model.get_submodule(layer)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (layout.out_features,
                                                                                    layout.in_features):
            raise ValueError(f"{ckpt.path}: quantized layer {layer} is not a linear layer of the network")
        new = QuantVocabHead(layout, old.parallel) if isinstance(old, VocabHead) else \
            QuantLinear(layout, bias=old.bias is not None)
        setattr(model.get_submodule(parent_name), child, new)
        stored_as_is.update(layout.tensor_names())
    return stored_as_is


def prepare_quant_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Cache every QuantLinear's dequantized weight in `dtype` (after its tensors were loaded)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare(dtype)


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers `model` holds (each storage once: stacked experts' views, packed
    weights, dequantized copies), i.e. what its weights cost in memory where it runs."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
