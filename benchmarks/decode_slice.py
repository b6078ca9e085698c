"""Decode tokens/s of a Nano-width slice of Nemotron 3 in bf16, fp8 and nvfp4, on one GPU.

    python benchmarks/decode_slice.py [--pattern MEMEM*] [--batches 1,64] [--past 512]

The slice has the real Nemotron 3 Nano 30B-A3B dimensions (DESIGN.md, "Real shapes": hidden 2688, 128 experts
top-6, Mamba 64x64 state 128, 32/2 attention heads) and the first layers of its pattern (`--pattern`, default
MEMEM*: 3 Mamba, 2 MoE, 1 attention), with random weights. Each precision quantizes those weights with our own
numerics (nvfp4: NVIDIA's checkpoint layout as Hopper runs it: routed experts NVFP4 weight-only, shared experts
and Mamba projections FP8 W8A8, FP8 KV cache; fp8 or any other nemo3 recipe name: that recipe's table): NVFP4
weights stay packed and run through the W4A16 grouped GEMM (plugins/grouped_gemm.py; W4A4 activations would
quantize-dequantize first, as Hopper has no FP4 tensor cores), FP8 layers through torch._scaled_mm. The timed call is the compiled decode step
of the runtime (engines/executors/compiled_step.py: one CUDA graph over the backbone, lm_head excluded, every row
continuing a sequence of `--past` tokens); it prints one Markdown row per precision and batch with tokens/s and
the ratio to bf16. The issue's goal: nvfp4 >= 1.8x and fp8 >= 1.5x bf16 at batch 1 and 64. Without CUDA it says
that a GPU is needed and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from nemo3.engines.executors.torch_executor import TorchExecutor
from nemo3.engines.network.model import Model
from nemo3.engines.network.moe import MoE
from nemo3.engines.network.quant_linear import QuantLinear, prepare_quant_linears, resident_weight_bytes
from nemo3.export.spec import ModelSpec
from nemo3.quant import fp8, nvfp4
from nemo3.quant.layout import BF16, FP8, NVFP4, OUTPUT_SCALES, LinearLayout
from nemo3.quant.recipes import NVFP4_W4A16, Recipe, Rule, load_recipe

NANO = dict(model_type="nemotron_h", vocab_size=131072, hidden_size=2688, num_attention_heads=32,
            num_key_value_heads=2, head_dim=128, attention_bias=False, mamba_num_heads=64, mamba_head_dim=64,
            ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128, use_conv_bias=True, use_bias=False,
            time_step_limit=[0.0, 1e30], mamba_hidden_act="silu", n_routed_experts=128, num_experts_per_tok=6,
            moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, n_shared_experts=1, n_group=1,
            topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, mlp_hidden_act="relu2", mlp_bias=False,
            num_nextn_predict_layers=0, layer_norm_epsilon=1e-5, tie_word_embeddings=False)
ACTIVATION_AMAX = 8.0  # calibrated input / K / V amax the random slice is given
# the layer formats of NVIDIA's Nemotron 3 NVFP4 checkpoints, as Hopper runs them (routed experts NVFP4 weight-only)
NVFP4_HOPPER = Recipe("nvfp4", layers=(Rule("backbone.layers.*.mixer.experts.*", NVFP4_W4A16),
                                       Rule("backbone.layers.*.mixer.shared_experts.*", FP8),
                                       Rule("backbone.layers.*.mixer.in_proj", FP8),
                                       Rule("backbone.layers.*.mixer.out_proj", FP8)), kv_cache=FP8)


def random_slice(config: dict, device: str) -> Model:
    """The Model of `config` in bf16 with random weights of realistic scale (no NaNs, stable Mamba decay)."""
    spec = ModelSpec.from_config(config, source="benchmarks/decode_slice.py")
    with torch.device("meta"):
        model = Model(spec)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, device=device, generator=g) * 15 + 1))
            elif p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=g)
            else:
                p.fill_(1.0 if "norm" in name or name.endswith(".D") else 0.0)
        for name, b in model.named_buffers():
            b.zero_()
    return model.to(torch.bfloat16).eval()


def apply_recipe(model: Model, recipe_name: str) -> None:
    """Replace each linear layer the recipe quantizes by a QuantLinear holding its weight quantized (and K/V scales
    for an FP8 KV cache), then prepare them and stack the experts as engines/network/loading.py does."""
    recipe = NVFP4_HOPPER if recipe_name == "nvfp4" else load_recipe(recipe_name)
    for layer, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not layer.startswith("backbone."):
            continue
        fmt = recipe.format_of(layer)
        kv = OUTPUT_SCALES.get(layer.rpartition(".")[2]) if recipe.kv_cache == FP8 else None
        if fmt == BF16 and kv is None:
            continue
        weight_format = NVFP4 if fmt == NVFP4_W4A16 else fmt
        layout = LinearLayout(layer, weight_format, module.out_features, module.in_features,
                              input_scale=fmt in (NVFP4, FP8), output_scale=kv)
        q = QuantLinear(layout).to(module.weight.device)
        w = module.weight.detach()
        if weight_format == NVFP4:
            t = nvfp4.quantize(w)
            q.weight, q.weight_scale, q.weight_scale_2 = t.packed, t.block_scale, t.global_scale
        elif weight_format == FP8:
            q.weight, q.weight_scale = fp8.quantize_weight(w)
        else:
            q.weight = nn.Parameter(w, requires_grad=False)
        if layout.input_scale:
            amax = torch.tensor(ACTIVATION_AMAX, device=w.device)
            q.input_scale = nvfp4.global_scale_from_amax(amax) if weight_format == NVFP4 else fp8.scale_from_amax(amax)
        if kv:
            setattr(q, kv, fp8.scale_from_amax(torch.tensor(ACTIVATION_AMAX, device=w.device)))
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    prepare_quant_linears(model, torch.bfloat16)
    for module in model.modules():
        if isinstance(module, MoE):
            module.stack_experts()


def decode_tokens_per_s(model: Model, batch: int, past: int) -> float:
    import triton.testing

    executor = TorchExecutor(model, max_sequences=batch, max_length=past + 8, compile=True)
    executor.warm_up(1)
    dev = model.device
    ids = torch.randint(3, model.spec.vocab_size, (batch, 1), device=dev)
    slots, lengths = torch.arange(batch, device=dev), torch.full((batch,), past, device=dev)
    ms = triton.testing.do_bench(lambda: executor.compiled.backbone(ids, slots, lengths), warmup=25, rep=200,
                                 return_mode="median")
    return batch / ms * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="MEMEM*", help="layer pattern of the slice (M, E, *, -)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--past", type=int, default=512, help="tokens already in every sequence")
    parser.add_argument("--precisions", default="bf16,fp8,nvfp4")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/decode_slice.py needs a CUDA GPU; none found.")
        return 0
    config = dict(NANO, hybrid_override_pattern=args.pattern, num_hidden_layers=len(args.pattern))
    print(f"{torch.cuda.get_device_name()}: Nano-width slice {args.pattern}, past {args.past}\n")
    print("| precision | batch | decode tok/s | vs bf16 | resident weights GiB |")
    print("|---|---:|---:|---:|---:|")
    baseline = {}
    for precision in args.precisions.split(","):
        model = random_slice(config, "cuda")
        if precision != "bf16":
            apply_recipe(model, precision)
        for batch in map(int, args.batches.split(",")):
            tps = decode_tokens_per_s(model, batch, args.past)
            baseline.setdefault(batch, tps)
            print(f"| {precision} | {batch} | {tps:.0f} | {tps / baseline[batch]:.2f} | "
                  f"{resident_weight_bytes(model) / 2**30:.2f} |", flush=True)
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
