"""Decode kernels at Nano and Super shapes on one GPU: time, achieved bandwidth, and what it is compared to.

    python benchmarks/kernels.py [--batches 1,4,16,64,256,1024] [--tokens 1] [--ops mamba,conv,route]

For each op, model and batch size it prints one Markdown table row: the median time of our Triton kernel
called from Python (triton.testing.do_bench: launch overhead included) and replayed in a CUDA graph
(do_bench_cudagraph: the device time a captured decode step pays), the bytes it actually moves divided by
the graph time, that bandwidth as a fraction of a device-to-device copy measured in the same run, the
plain-torch reference's time on the same GPU, mamba_ssm's `selective_state_update` / causal_conv1d's
`causal_conv1d_update` when they are importable, and the relative error ||kernel - reference|| /
||reference|| over all outputs (fresh random inputs). Without CUDA it says that a GPU is needed and exits 0.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass

import torch

from nemo3.plugins.causal_conv1d_update import causal_conv1d_update
from nemo3.plugins.latent_moe_route import latent_moe_route
from nemo3.plugins.mamba2_state_update import mamba2_state_update


@dataclass(frozen=True)
class Shapes:
    """The decode-relevant sizes of one model (DESIGN.md, "Real shapes")."""
    heads: int
    head_dim: int
    state: int
    groups: int
    conv_kernel: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    scale: float

    @property
    def conv_dim(self) -> int:
        return self.heads * self.head_dim + 2 * self.groups * self.state


MODELS = {
    "Nano": Shapes(64, 64, 128, 8, 4, experts=128, top_k=6, n_group=1, topk_group=1, scale=2.5),
    "Super": Shapes(128, 64, 128, 8, 4, experts=512, top_k=22, n_group=1, topk_group=1, scale=5.0),
}
ACT = torch.bfloat16
DEVICE = "cuda"


@dataclass
class Row:
    model: str
    batch: int
    kernel_ms: float
    graph_ms: float
    bytes_moved: int
    reference_ms: float
    upstream_ms: float | None
    rel_err: float


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6


def optional(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        return None


def bench_graph(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def rel_err(pairs) -> float:
    """||got - want|| / ||want|| over every (got, want) output pair, in float64."""
    diff = sum((a.double() - b.double()).norm() ** 2 for a, b in pairs) ** 0.5
    return (diff / sum(b.double().norm() ** 2 for _, b in pairs) ** 0.5).item()


# ---- ops ----------------------------------------------------------------------------------------------------

def mamba_row(model: str, s: Shapes, batch: int, tokens: int) -> Row:
    dev, H, P, N, G = DEVICE, s.heads, s.head_dim, s.state, s.groups
    pool = torch.randn(batch, H, P, N, device=dev)
    slots = torch.randperm(batch, device=dev).to(torch.int32)
    x, z = (torch.randn(batch, tokens, H, P, device=dev, dtype=ACT) for _ in range(2))
    B, C = (torch.randn(batch, tokens, G, N, device=dev, dtype=ACT) for _ in range(2))
    dt = torch.randn(batch, tokens, H, device=dev, dtype=ACT)
    A, D, dt_bias = -torch.rand(H, device=dev) - 0.5, torch.randn(H, device=dev), torch.randn(H, device=dev)
    args = (x, dt, A, B, C, D, dt_bias, slots)

    ref_pool = pool.clone()
    err = rel_err([(mamba2_state_update(pool, *args, z=z, impl="triton"),
                    mamba2_state_update(ref_pool, *args, z=z, impl="reference")), (pool, ref_pool)])
    kernel = bench(lambda: mamba2_state_update(pool, *args, z=z, impl="triton"))
    graph = bench_graph(lambda: mamba2_state_update(pool, *args, z=z, impl="triton"))
    reference = bench(lambda: mamba2_state_update(ref_pool, *args, z=z, impl="reference"))
    del ref_pool

    upstream = None
    ssu = optional("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    if ssu is not None and tokens == 1:
        extra = {"state_batch_indices": slots} if "state_batch_indices" in inspect.signature(ssu).parameters else {}
        up = (x[:, 0], dt[:, 0, :, None].expand(batch, H, P), A[:, None, None].expand(H, P, N), B[:, 0], C[:, 0],
              D[:, None].expand(H, P))
        upstream = bench(lambda: ssu(pool, *up, z=z[:, 0], dt_bias=dt_bias[:, None].expand(H, P), dt_softplus=True,
                                     **extra))

    act = torch.finfo(ACT).bits // 8
    moved = (2 * batch * H * P * N * 4                                   # state read + write
             + batch * tokens * (3 * H * P + 2 * G * N + H) * act)       # x, z, y, B, C, dt
    return Row(model, batch, kernel, graph, moved, reference, upstream, err)


def conv_row(model: str, s: Shapes, batch: int, tokens: int) -> Row:
    dev, Cd, K = DEVICE, s.conv_dim, s.conv_kernel
    pool = torch.randn(batch, Cd, K - 1, device=dev, dtype=ACT)
    slots = torch.randperm(batch, device=dev).to(torch.int32)
    x = torch.randn(batch, tokens, Cd, device=dev, dtype=ACT)
    weight, bias = torch.randn(Cd, K, device=dev, dtype=ACT), torch.randn(Cd, device=dev, dtype=ACT)

    ref_pool = pool.clone()
    err = rel_err([(causal_conv1d_update(x, pool, weight, bias, slots, impl="triton"),
                    causal_conv1d_update(x, ref_pool, weight, bias, slots, impl="reference")), (pool, ref_pool)])
    kernel = bench(lambda: causal_conv1d_update(x, pool, weight, bias, slots, impl="triton"))
    graph = bench_graph(lambda: causal_conv1d_update(x, pool, weight, bias, slots, impl="triton"))
    reference = bench(lambda: causal_conv1d_update(x, ref_pool, weight, bias, slots, impl="reference"))

    upstream = None
    ccu = optional("causal_conv1d", "causal_conv1d_update")
    if ccu is not None and tokens == 1:
        extra = {"conv_state_indices": slots} if "conv_state_indices" in inspect.signature(ccu).parameters else {}
        upstream = bench(lambda: ccu(x[:, 0], pool, weight, bias, activation="silu", **extra))

    act = torch.finfo(ACT).bits // 8
    moved = (2 * batch * Cd * (K - 1) + 2 * batch * tokens * Cd + Cd * (K + 1)) * act
    return Row(model, batch, kernel, graph, moved, reference, upstream, err)


def route_row(model: str, s: Shapes, batch: int, tokens: int) -> Row:
    T = batch * tokens
    logits = torch.randn(T, s.experts, device=DEVICE)
    bias = 0.1 * torch.randn(s.experts, device=DEVICE)
    args = (logits, bias, s.top_k, s.n_group, s.topk_group, True, s.scale)
    (w, ids), (w_ref, ids_ref) = latent_moe_route(*args, impl="triton"), latent_moe_route(*args, impl="reference")
    err = rel_err([(w, w_ref)]) if torch.equal(ids, ids_ref) else float("inf")
    kernel = bench(lambda: latent_moe_route(*args, impl="triton"))
    graph = bench_graph(lambda: latent_moe_route(*args, impl="triton"))
    reference = bench(lambda: latent_moe_route(*args, impl="reference"))
    moved = 4 * (T * s.experts + s.experts + 2 * T * s.top_k)
    return Row(model, batch, kernel, graph, moved, reference, None, err)


OPS = {
    "mamba": ("mamba2_state_update (fp32 state, bf16 activations)", mamba_row, "mamba_ssm selective_state_update"),
    "conv": ("causal_conv1d_update (bf16 window, K=4)", conv_row, "causal_conv1d_update"),
    "route": ("latent_moe_route (sigmoid, group top-k, renormalize)", route_row, "-"),
}


def table(title: str, upstream_name: str, rows: list[Row], copy_gbs: float) -> str:
    lines = [f"### {title}", "",
             f"| model | batch | kernel µs | in graph µs | GB/s (graph) | % of copy | reference µs | ref / kernel "
             f"| {upstream_name} µs | rel. error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gbs = r.bytes_moved / r.graph_ms / 1e6
        up = f"{1e3 * r.upstream_ms:.1f}" if r.upstream_ms is not None else "n/a"
        lines.append(f"| {r.model} | {r.batch} | {1e3 * r.kernel_ms:.1f} | {1e3 * r.graph_ms:.1f} | {gbs:.0f} "
                     f"| {100 * gbs / copy_gbs:.0f}% | {1e3 * r.reference_ms:.1f} | {r.reference_ms / r.kernel_ms:.1f}x "
                     f"| {up} | {r.rel_err:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16,64,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per sequence (k for speculative verify)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: needs a CUDA GPU (none found); nothing measured.")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s, tokens per sequence "
          f"{args.tokens}, torch {torch.__version__}\n")
    for op in args.ops.split(","):
        title, row, upstream_name = OPS[op]
        rows = [row(m, MODELS[m], b, args.tokens) for m in args.models.split(",") for b in batches]
        print(table(title, upstream_name, rows, copy_gbs) + "\n")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
