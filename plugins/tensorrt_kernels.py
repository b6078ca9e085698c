"""The nemo3 plugin nodes (plugins/onnx_nodes.py) as TensorRT AOT kernels: PTX and launch parameters, made on any
machine (no GPU, no TensorRT; needs triton and a process with TRITON_INTERPRET off to compile).

TensorRT launches an AOT plugin's kernel with (input pointers..., extra int32 arguments..., output pointers...),
each tensor dense (row-major), and passes null for parameters it was not given (Triton's hidden scratch pointers,
which must therefore be unused). Each node has a small wrapper kernel below with exactly that parameter list: the
node's inputs, then its outputs (an aliased output is the same buffer as its input: the wrapper updates the input
in place, as the op does). Shapes are static per engine (one per step shape), so sizes, scalars and the dense
strides are the wrapper's constexprs and there are no extra arguments. The wrapper calls the op's Triton kernel;
grid, num_warps and block sizes come from the op's `prepare`, the function its Triton launcher runs. Paged
attention launches its kernel with one split (`prepare(..., splits=1)`): each program walks all of its row's pages
and writes the normalized output, so the plugin is one launch with no merge and no workspace.

Shared memory: TensorRT's AOT plugin interface takes a kernel's launch as grid, block and `shared_mem` bytes
(`tensorrt.plugin.KernelLaunchParams`, `IKernelLaunchParams::setSharedMem`) and documents no way to raise the kernel's
dynamic shared-memory limit above the default 48 KB (what Triton's own launcher does with cuFuncSetAttribute when a
kernel needs more), so `compile_plugin` keeps each kernel within 48 KB: the op's Triton launch (its default software
pipelining) if that fits, else the same launch with fewer pipeline stages (paged attention at Nano's shapes: 3 stages
need 81,924 B, 1 stage 49,152 B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import compile_signature
from .causal_conv1d_update_triton import _causal_conv1d_update_kernel
from .causal_conv1d_update_triton import prepare as conv_prepare
from .latent_moe_route_triton import _latent_moe_route_kernel
from .latent_moe_route_triton import prepare as route_prepare
from .mamba2_state_update_triton import _mamba2_state_update_kernel
from .mamba2_state_update_triton import prepare as mamba_prepare
from .paged_attention_triton import _paged_attention_kernel
from .paged_attention_triton import prepare as attention_prepare

WHERE = "plugins/tensorrt_kernels.py"
SHARED_MEMORY_LIMIT = 48 * 1024  # bytes of dynamic shared memory a kernel may take without opting in
PIPELINE_STAGES = (None, 2, 1)  # tried in order (None: Triton's default num_stages for the arch)


@triton.jit
def causal_conv1d_update_trt(x_ptr, pool_ptr, w_ptr, bias_ptr, slots_ptr, out_ptr, pool_out_ptr,
                             T: tl.constexpr, C: tl.constexpr, K: tl.constexpr, SILU: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    _causal_conv1d_update_kernel(x_ptr, pool_ptr, w_ptr, bias_ptr, slots_ptr, out_ptr, pool_ptr, T, C, K,
                                 T * C, C, 1, C * (K - 1), K - 1, 1, K, 1, 1, T * C, C, 1, 0, 0, 0, 0,
                                 True, SILU, False, BLOCK_C, BLOCK_K)


@triton.jit
def causal_conv1d_update_steps_trt(x_ptr, pool_ptr, w_ptr, bias_ptr, slots_ptr, inter_ptr, out_ptr, pool_out_ptr,
                                   inter_out_ptr, T: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                                   SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    _causal_conv1d_update_kernel(x_ptr, pool_ptr, w_ptr, bias_ptr, slots_ptr, out_ptr, inter_ptr, T, C, K,
                                 T * C, C, 1, C * (K - 1), K - 1, 1, K, 1, 1, T * C, C, 1,
                                 T * C * (K - 1), C * (K - 1), K - 1, 1, True, SILU, True, BLOCK_C, BLOCK_K)


@triton.jit
def _mamba2_dense(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr, y_ptr, inter_ptr,
                  T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, G: tl.constexpr,
                  DT_MIN: tl.constexpr, DT_MAX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_INTER: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    _mamba2_state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr, x_ptr,
                                y_ptr, inter_ptr, T, P, N, H // G, DT_MIN, DT_MAX,
                                H * P * N, P * N, N, 1,                      # state [S, H, P, N]
                                T * H * P, H * P, P, 1,                      # x [Bt, T, H, P]
                                T * H, H, 1,                                 # dt [Bt, T, H]
                                T * G * N, G * N, N, 1, T * G * N, G * N, N, 1,  # B, C [Bt, T, G, N]
                                0, 0, 0, 0,                                  # (no z)
                                T * H * P, H * P, P, 1,                      # y like x
                                T * H * P * N, H * P * N, P * N, N, 1,       # intermediate [Bt, T, H, P, N]
                                1, 1, 1, DT_SOFTPLUS, False, HAS_INTER, BLOCK_P, BLOCK_N)


@triton.jit
def mamba2_state_update_trt(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr,
                            y_ptr, state_out_ptr,
                            T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, G: tl.constexpr,
                            DT_MIN: tl.constexpr, DT_MAX: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    _mamba2_dense(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr, y_ptr, state_ptr,
                  T, H, P, N, G, DT_MIN, DT_MAX, DT_SOFTPLUS, False, BLOCK_P, BLOCK_N)


@triton.jit
def mamba2_state_update_steps_trt(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr,
                                  inter_ptr, y_ptr, state_out_ptr, inter_out_ptr,
                                  T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                                  G: tl.constexpr, DT_MIN: tl.constexpr, DT_MAX: tl.constexpr,
                                  DT_SOFTPLUS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    _mamba2_dense(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slots_ptr, y_ptr, inter_ptr,
                  T, H, P, N, G, DT_MIN, DT_MAX, DT_SOFTPLUS, True, BLOCK_P, BLOCK_N)


@triton.jit
def latent_moe_route_trt(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E: tl.constexpr, N_GROUP: tl.constexpr,
                         TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, SCALE: tl.constexpr, NORM: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, BLOCK_K: tl.constexpr):
    _latent_moe_route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E // N_GROUP, N_GROUP, TOPK_GROUP, TOP_K,
                             SCALE, E, 1, 1, TOP_K, 1, TOP_K, 1, NORM, BLOCK_G, BLOCK_GS, BLOCK_K)


@triton.jit
def _paged_attention_dense(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                           T: tl.constexpr, G: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr,
                           SCALE: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           FP8: tl.constexpr, IEEE: tl.constexpr):
    # one split over all WIDTH pages of a row: the kernel normalizes and writes out itself (SINGLE)
    _paged_attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr, out_ptr,
                            out_ptr, T, G, T * G, KV, D, WIDTH, SCALE,
                            T * KV * G * D, KV * G * D, D, 1,            # q [B, T, H, D]
                            PAGE * KV * D, KV * D, D, 1, PAGE * KV * D, KV * D, D, 1,  # k, v pages [P, PAGE, KV, D]
                            WIDTH, 1,                                    # block table [B, WIDTH]
                            T * KV * G * D, KV * G * D, D, 1,            # out like q
                            0, 0, 0, PAGE, BLOCK_M, BLOCK_D, FP8, IEEE, True)


@triton.jit
def paged_attention_trt(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, T: tl.constexpr, G: tl.constexpr,
                        KV: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, SCALE: tl.constexpr,
                        PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    _paged_attention_dense(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, out_ptr, out_ptr, T, G, KV, D, WIDTH,
                           SCALE, PAGE, BLOCK_M, BLOCK_D, False, IEEE)


@triton.jit
def paged_attention_fp8_trt(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                            T: tl.constexpr, G: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                            WIDTH: tl.constexpr, SCALE: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    _paged_attention_dense(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr, T, G, KV,
                           D, WIDTH, SCALE, PAGE, BLOCK_M, BLOCK_D, True, IEEE)


@dataclass
class LaunchPlan:
    """One node's launch: `kernel[grid](*inputs, *outputs, num_warps=num_warps, **constexprs)` (outputs: new
    tensors for a node's own outputs, the input itself for an aliased one)."""
    kernel: object
    grid: tuple[int, ...]
    num_warps: int
    constexprs: dict
    outputs: list[torch.Tensor]


@dataclass(frozen=True)
class PluginKernel:
    """What a TensorRT AOT plugin returns for one node: the PTX's entry name and text, the launch parameters (and
    the pipeline stages the PTX was compiled with)."""
    name: str
    ptx: str
    grid: tuple[int, int, int]
    block: int
    shared_mem: int
    num_stages: int


def _split(meta: dict, *names: str) -> tuple[int, dict]:
    return meta["num_warps"], {name: meta[name] for name in names}


def _conv_plan(inputs, silu):
    x, pool, weight, bias, slots, *steps = inputs
    inter = steps[0] if steps else None
    out, grid, _, meta = conv_prepare(x, pool, weight, bias, slots, silu, inter, on_gpu=True)
    num_warps, consts = _split(meta, "SILU", "BLOCK_C", "BLOCK_K")
    kernel = causal_conv1d_update_steps_trt if steps else causal_conv1d_update_trt
    consts.update(T=x.shape[1], C=x.shape[2], K=weight.shape[1])
    return LaunchPlan(kernel, grid, num_warps, consts, [out, pool, *steps])


def _mamba_plan(inputs, dt_softplus, dt_min, dt_max):
    state, x, dt, A, B, C, D, dt_bias, slots, *steps = inputs
    inter = steps[0] if steps else None
    y, grid, _, meta = mamba_prepare(state, x, dt, A, B, C, D, dt_bias, slots, None, dt_softplus, dt_min, dt_max,
                                     inter, on_gpu=True)
    num_warps, consts = _split(meta, "DT_SOFTPLUS", "BLOCK_P", "BLOCK_N")
    kernel = mamba2_state_update_steps_trt if steps else mamba2_state_update_trt
    consts.update(T=x.shape[1], H=x.shape[2], P=x.shape[3], N=B.shape[3], G=B.shape[2], DT_MIN=float(dt_min),
                  DT_MAX=float(dt_max))
    return LaunchPlan(kernel, grid, num_warps, consts, [y, state, *steps])


def _route_plan(inputs, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    logits, bias = inputs
    outputs, grid, _, meta = route_prepare(logits, bias, top_k, n_group, topk_group, norm_topk_prob,
                                           routed_scaling_factor)
    num_warps, consts = _split(meta, "NORM", "BLOCK_G", "BLOCK_GS", "BLOCK_K")
    consts.update(E=logits.shape[1], N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
                  SCALE=float(routed_scaling_factor))
    return LaunchPlan(latent_moe_route_trt, grid, num_warps, consts, list(outputs))


def _attention_plan(inputs, scale):
    q, k_pages, v_pages, table, lens, *scales = inputs
    outputs, grid, _, meta = attention_prepare(q, k_pages, v_pages, table, lens, scale, *scales, splits=1)
    num_warps, consts = _split(meta, "PAGE", "BLOCK_M", "BLOCK_D", "IEEE")
    kernel = paged_attention_fp8_trt if scales else paged_attention_trt
    KV = k_pages.shape[2]
    consts.update(T=q.shape[1], G=q.shape[2] // KV, KV=KV, D=q.shape[3], WIDTH=table.shape[1], SCALE=float(scale))
    return LaunchPlan(kernel, grid, num_warps, consts, list(outputs))


PLANS = {
    "causal_conv1d_update": (_conv_plan, ("silu",)),
    "causal_conv1d_update_steps": (_conv_plan, ("silu",)),
    "mamba2_state_update": (_mamba_plan, ("dt_softplus", "dt_min", "dt_max")),
    "mamba2_state_update_steps": (_mamba_plan, ("dt_softplus", "dt_min", "dt_max")),
    "paged_attention": (_attention_plan, ("scale",)),
    "paged_attention_fp8": (_attention_plan, ("scale",)),
    "latent_moe_route": (_route_plan, ("top_k", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")),
}


def launch_plan(op_type: str, inputs: list[torch.Tensor], attributes: dict) -> LaunchPlan:
    """The launch of node `op_type` on `inputs` (real or meta tensors, the node's input order) with its
    attributes (plugins/onnx_nodes.py; plugin_namespace/plugin_version ignored)."""
    if op_type not in PLANS:
        raise ValueError(f"{WHERE}: no TensorRT kernel for nemo3 node {op_type!r} (known: {', '.join(PLANS)})")
    plan, names = PLANS[op_type]
    return plan(inputs, *(attributes[name] for name in names))


def pointer_type(tensor: torch.Tensor) -> str:
    from triton.runtime.jit import type_canonicalisation_dict

    return "*" + type_canonicalisation_dict[str(tensor.dtype).removeprefix("torch.")]


def compile_plugin(op_type: str, inputs: list[torch.Tensor], attributes: dict, capability: int = 90
                   ) -> PluginKernel:
    """PTX for sm_<capability> and the launch parameters of node `op_type` (see launch_plan), with the most
    pipeline stages (PIPELINE_STAGES) whose shared memory fits SHARED_MEMORY_LIMIT."""
    plan = launch_plan(op_type, inputs, attributes)
    pointers = [name for name in plan.kernel.arg_names if name not in plan.constexprs]
    tensors = list(inputs) + plan.outputs
    if len(pointers) != len(tensors):
        raise RuntimeError(f"{WHERE}: {op_type}'s wrapper takes {len(pointers)} tensors, the node has {len(tensors)}")
    signature = {name: pointer_type(t) for name, t in zip(pointers, tensors)}
    signature.update({name: "constexpr" for name in plan.constexprs})
    aligned = {(plan.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    for stages in PIPELINE_STAGES:
        options = {"num_warps": plan.num_warps, **({"num_stages": stages} if stages else {})}
        compiled = compile_signature(plan.kernel, signature, dict(plan.constexprs), options, capability, aligned)
        meta = compiled.metadata
        if meta.shared <= SHARED_MEMORY_LIMIT:
            break
    else:
        raise RuntimeError(f"{WHERE}: {op_type}'s kernel needs {meta.shared} B of shared memory with one pipeline "
                           f"stage, over TensorRT's {SHARED_MEMORY_LIMIT} B")
    if meta.global_scratch_size or meta.profile_scratch_size:
        raise RuntimeError(f"{WHERE}: {op_type}'s kernel needs scratch memory, which TensorRT does not provide")
    grid = tuple(plan.grid) + (1,) * (3 - len(plan.grid))
    return PluginKernel(meta.name, compiled.asm["ptx"], grid, meta.num_warps * 32, meta.shared, meta.num_stages)
