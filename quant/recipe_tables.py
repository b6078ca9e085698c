"""The built-in recipes, in exactly the form a user recipe file takes (YAML or JSON; see quant/recipes.py).

`layers` is an ordered table of fnmatch patterns over canonical layer names (export/names.py without
the `.weight`, e.g. `backbone.layers.3.mixer.in_proj`, `backbone.layers.1.mixer.experts.7.up_proj`,
`lm_head`); the first pattern that matches a layer gives its format, and a layer that no pattern
matches stays BF16. The router (`mixer.gate`), conv1d, norms and embeddings are never quantized.
A pattern that matches no layer of the model is an error, unless it is marked `optional` (a layer
kind that only some Nemotron 3 models have, such as the LatentMoE projections of Super).

Formats: `nvfp4` (W4A4 NVFP4), `nvfp4_w4a16` (NVFP4 weights only), `fp8` (W8A8 per-tensor FP8),
`bf16` (unquantized). `kv_cache`: `fp8` or `bf16`. `ssm_state`: the Mamba SSM cache dtype.
"""

NVFP4 = {
    "name": "nvfp4",
    "description": "NVIDIA's Nemotron 3 NVFP4 layout: routed experts NVFP4; shared experts and Mamba in/out "
                   "projections FP8; attention, latent projections, router, conv1d, MTP and lm_head BF16",
    "kv_cache": "fp8",
    "ssm_state": "float32",
    "layers": [
        {"pattern": "backbone.layers.*.mixer.experts.*", "format": "nvfp4"},
        {"pattern": "backbone.layers.*.mixer.shared_experts.*", "format": "fp8"},
        {"pattern": "backbone.layers.*.mixer.in_proj", "format": "fp8"},
        {"pattern": "backbone.layers.*.mixer.out_proj", "format": "fp8"},
    ],
}

NVFP4_CONSERVATIVE = {
    "name": "nvfp4-conservative",
    "description": "Like nvfp4, with the Mamba in/out projections BF16 too",
    "kv_cache": "fp8",
    "ssm_state": "float32",
    "layers": [
        {"pattern": "backbone.layers.*.mixer.experts.*", "format": "nvfp4"},
        {"pattern": "backbone.layers.*.mixer.shared_experts.*", "format": "fp8"},
    ],
}

FP8 = {
    "name": "fp8",
    "description": "Every backbone linear layer FP8 (W8A8 per-tensor) except the LatentMoE projections; "
                   "router, conv1d, MTP and lm_head BF16",
    "kv_cache": "fp8",
    "ssm_state": "float32",
    "layers": [
        {"pattern": "backbone.layers.*.mixer.fc?_latent_proj", "format": "bf16", "optional": True},
        {"pattern": "backbone.layers.*", "format": "fp8"},
    ],
}

BF16 = {
    "name": "bf16",
    "description": "No quantization",
    "kv_cache": "bf16",
    "ssm_state": "float32",
    "layers": [],
}

# The ablation baseline: what ModelOpt's stock NVFP4_DEFAULT_CFG quantizes (every linear layer of the
# backbone, attention, Mamba, shared experts and latent projections included). lm_head, router,
# conv1d and MTP stay BF16 as they do there; the FP8 KV cache matches nvfp4, so the accuracy report
# isolates what the layer formats buy.
NVFP4_ALL = {
    "name": "nvfp4-all",
    "description": "Ablation only: every backbone linear layer NVFP4; lm_head, router, conv1d and MTP BF16",
    "kv_cache": "fp8",
    "ssm_state": "float32",
    "layers": [
        {"pattern": "backbone.layers.*", "format": "nvfp4"},
    ],
}

BUILTIN = [NVFP4, NVFP4_CONSERVATIVE, FP8, BF16, NVFP4_ALL]
