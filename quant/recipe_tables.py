"""nemo3's own recipes, in exactly the form a user recipe file takes (YAML or JSON; see quant/recipes.py),
and the short names of NVIDIA's (ALIASES, at the end).

`layers` is an ordered table of fnmatch patterns over canonical layer names (export/names.py without
the `.weight`, e.g. `backbone.layers.3.mixer.in_proj`, `backbone.layers.1.mixer.experts.7.up_proj`,
`lm_head`); the first pattern that matches a layer gives its format, and a layer that no pattern
matches stays BF16. The router (`mixer.gate`), conv1d, norms and embeddings are never quantized.
A pattern that matches no layer of the model is an error, unless it is marked `optional` (a layer
kind that only some Nemotron 3 models have, such as the LatentMoE projections of Super).

Formats: `nvfp4` (W4A4 NVFP4), `nvfp4_w4a16` (NVFP4 weights only), `fp8` (W8A8 per-tensor FP8),
`bf16` (unquantized). `kv_cache`: `fp8` or `bf16`. `ssm_state`: the Mamba SSM cache dtype.
"""

NVFP4_CONSERVATIVE = {
    "name": "nvfp4-conservative",
    "description": "NVIDIA's Super NVFP4 layout with the Mamba in/out projections BF16 too (routed experts NVFP4, "
                   "shared experts FP8, FP8 KV cache)",
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

BUILTIN = [NVFP4_CONSERVATIVE, FP8, BF16, NVFP4_ALL]

# Short names for NVIDIA's recipes as ModelOpt 0.47 ships them (quant/modelopt_recipes.py): nemo3 runs
# those files, it does not copy them. `nvfp4` (the default of --precision nvfp4) is Super's layout with
# max calibration: routed experts NVFP4, shared experts and Mamba in/out projections FP8, FP8 KV cache,
# the rest BF16.
_NVIDIA = "nvidia/NVIDIA-Nemotron-3"
ALIASES = {
    "nvfp4": f"{_NVIDIA}-Super-120B-A12B-BF16/ptq/nvfp4-max-calib",
    "nvfp4-mse": f"{_NVIDIA}-Super-120B-A12B-BF16/ptq/nvfp4-mse",
    "nvfp4-4o6": f"{_NVIDIA}-Ultra-550B-A55B-BF16/ptq/nvfp4-4o6",
    "nvfp4-w4a16": f"{_NVIDIA}.5-Lightning-30B-A3B-BF16/ptq/w4a16_nvfp4_4o6",
}
