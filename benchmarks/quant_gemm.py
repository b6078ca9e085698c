"""Weight-only NVFP4 GEMM (W4A16) and FP8 W8A8 against torch's bf16 matmul at Nano and Super shapes, on one GPU.

    python benchmarks/quant_gemm.py [--rows 1,16,64,256] [--models Nano,Super]

For each layer shape (N x K of a real Nemotron 3 linear layer) and M rows it prints one Markdown table row:
the median time (triton.testing.do_bench, launch overhead included) of torch's bf16 `x @ W^T`, of our W4A16
kernel (plugins/grouped_gemm.py: weight packed as E2M1 + E4M3 block scales, decoded in registers), of FP8 W8A8
through torch._scaled_mm (plugins/fp8_linear.py), the speed-ups over bf16, the W4A16 kernel's achieved bandwidth
(weight + scales + activations + output bytes over its time) and that bandwidth as a fraction of a
device-to-device copy measured in the same run (the practical HBM roofline), and the kernel's relative error
||kernel - bf16 matmul of the dequantized weight|| / ||reference||. The issue's goal: >= 3x bf16 at M <= 16 and
>= 80% of the roofline. Without CUDA it says that a GPU is needed and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch
from kernels import bench, copy_bandwidth  # benchmarks/kernels.py: the same timing and roofline

from nemo3.plugins.fp8_linear import fp8_linear
from nemo3.plugins.grouped_gemm import dequantize_nvfp4, nvfp4_linear
from nemo3.quant import fp8, nvfp4

# (name, N, K) of the linear layers of each model (DESIGN.md, "Real shapes"); experts are one expert's GEMMs
LAYERS = {
    "Nano": [("mamba in_proj", 2 * 4096 + 2 * 8 * 128 + 64, 2688), ("mamba out_proj", 2688, 4096),
             ("shared up", 3712, 2688), ("shared down", 2688, 3712), ("expert up", 1856, 2688),
             ("expert down", 2688, 1856), ("q_proj", 4096, 2688)],
    "Super": [("mamba in_proj", 2 * 8192 + 2 * 8 * 128 + 128, 4096), ("mamba out_proj", 4096, 8192),
              ("shared up", 5376, 4096), ("shared down", 4096, 5376), ("expert up", 2688, 1024),
              ("expert down", 1024, 2688), ("q_proj", 4096, 4096)],
}
DEVICE = "cuda"


def row(model: str, layer: str, N: int, K: int, M: int, roofline: float) -> str:
    g = torch.Generator(device=DEVICE).manual_seed(M + N + K)
    w = torch.randn(N, K, device=DEVICE, generator=g, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=DEVICE, generator=g, dtype=torch.bfloat16)
    q = nvfp4.quantize(w)
    w_q, w_scale = fp8.quantize_weight(w)
    x_scale = fp8.scale_from_amax(x.abs().amax())
    x_q = fp8.quantize(x, x_scale)
    bf16_ms = bench(lambda: x @ w.T)
    w4_ms = bench(lambda: nvfp4_linear(x, q.packed, q.block_scale, q.global_scale))
    fp8_ms = bench(lambda: fp8_linear(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16))
    moved = q.packed.numel() + q.block_scale.numel() + 4 + x.numel() * 2 + M * N * 2
    gbps = moved / w4_ms / 1e6
    want = (x.float() @ dequantize_nvfp4(q.packed, q.block_scale, q.global_scale, torch.bfloat16).float().T)
    got = nvfp4_linear(x, q.packed, q.block_scale, q.global_scale).float()
    err = ((got - want).norm() / want.norm()).item()
    return (f"| {model} | {layer} | {N}x{K} | {M} | {bf16_ms * 1e3:.1f} | {w4_ms * 1e3:.1f} | {fp8_ms * 1e3:.1f} | "
            f"{bf16_ms / w4_ms:.2f} | {bf16_ms / fp8_ms:.2f} | {gbps:.0f} | {gbps / roofline:.0%} | {err:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64,256", help="M values (tokens per GEMM), comma-separated")
    parser.add_argument("--models", default="Nano,Super")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/quant_gemm.py needs a CUDA GPU; none found.")
        return 0
    roofline = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {roofline:.0f} GB/s\n")
    print("| model | layer | N x K | M | bf16 us | W4A16 us | FP8 us | W4A16 x | FP8 x | W4A16 GB/s | of roofline | rel err |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for layer, N, K in LAYERS[model]:
            for M in map(int, args.rows.split(",")):
                print(row(model, layer, N, K, M, roofline), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
