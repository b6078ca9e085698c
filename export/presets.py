"""Hub-style config.json dicts of the Nemotron 3 family, for planning without a checkpoint.

Every entry is a `nemotron_h` config as its hub checkpoint publishes it, in that checkpoint's own key style;
where a value could not be checked against a published file, the entry says so.

* nano (nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16): that config.json's architecture keys and
  `hybrid_override_pattern` (52 layers: 23 M, 23 E, 6 *).
* super (nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16): the pattern (88 layers: 40 M, 40 E, 8 *) as
  quoted, with that checkpoint's safetensors parameter total (123,611,033,088, which these shapes
  reproduce exactly; tests/test_planner.py checks it), by a public parameter-count test; MTP `*E`.
* lightning (nvidia/NVIDIA-Nemotron-3.5-Lightning-30B-A3B-BF16): Nano 30B-A3B's architecture (the
  52-layer, 2688-wide, 128-expert top-6 signature public loaders match it by) plus one MTP layer and
  1M positions. Not checked against its file: that the pattern is Nano's and the MTP pattern is `*E`.
* ultra (nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-BF16): published with transformers-5 style
  `layers_block_type` / `mtp_layers_block_type` (mamba, moe, attention): 108 layers, attention at
  7, 14, 23, 32, 39, 48, 57, 64, 73, 82, 89, 98 and Mamba/MoE alternating between (48 M, 48 E, 12 *),
  hidden 8192, 64 query / 2 KV heads of 128, Mamba 256 heads x 64, state 128, 8 groups, LatentMoE
  512 experts top-22 of width 5120 (shared 5120) in a 2048 latent, as public loaders and tests quote
  it. Not checked: routed_scaling_factor and routing groups (Super's values are used).
* nano-4b (nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16): a dense hybrid (M, -, *). Its config.json was not
  found in any public source nemo3 could search; the pattern is reconstructed from NVIDIA's own ModelOpt
  recipe for it (MLP `down_proj` of layers 1, 3, 5, 8, 10, 13, 15, 18, 20, 22, 25, 27, 29, 33, 37, 39,
  41; attention `v_proj` of 24 and 32; the rest Mamba: 42 layers) and the widths are Nemotron-H 4B's
  (hidden 3072, FFN 12288, 32/8 heads, Mamba 112 x 64). Treat its plan as an estimate.
"""

from __future__ import annotations

NANO_CONFIG: dict = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 2688,
    "num_hidden_layers": 52,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": False,
    "mamba_num_heads": 64,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_ssm_cache_dtype": "float32",
    "intermediate_size": 1856,
    "mlp_bias": False,
    "n_routed_experts": 128,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 0,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "max_position_embeddings": 262144,
}

SUPER_CONFIG: dict = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 4096,
    "num_hidden_layers": 88,
    "hybrid_override_pattern": ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
                                "EMEMEMEM*EMEMEMEME"),
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": False,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_ssm_cache_dtype": "float32",
    "mlp_bias": False,
    "n_routed_experts": 512,
    "num_experts_per_tok": 22,
    "moe_intermediate_size": 2688,
    "moe_shared_expert_intermediate_size": 5376,
    "moe_latent_size": 1024,
    "n_shared_experts": 1,
    "routed_scaling_factor": 5.0,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
}

LIGHTNING_CONFIG: dict = {
    **NANO_CONFIG,
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    "max_position_embeddings": 1048576,
}

ULTRA_CONFIG: dict = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 8192,
    "num_hidden_layers": 108,
    "layers_block_type": [{"M": "mamba", "E": "moe", "*": "attention"}[c] for c in
                          "MEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*"
                          "EMEMEMEM*EMEMEMEME"],
    "num_attention_heads": 64,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": False,
    "mamba_num_heads": 256,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_ssm_cache_dtype": "float32",
    "mlp_bias": False,
    "n_routed_experts": 512,
    "num_experts_per_tok": 22,
    "moe_intermediate_size": 5120,
    "moe_shared_expert_intermediate_size": 5120,
    "moe_latent_size": 2048,
    "n_shared_experts": 1,
    "routed_scaling_factor": 5.0,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "mtp_layers_block_type": ["attention", "moe"],
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
}

NANO_4B_CONFIG: dict = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 3072,
    "num_hidden_layers": 42,
    "hybrid_override_pattern": "M-M-M-MM-M-MM-M-MM-M-M-M*-M-M-MM*-MMM-M-M-",
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "attention_bias": False,
    "mamba_num_heads": 112,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_ssm_cache_dtype": "float32",
    "intermediate_size": 12288,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "num_nextn_predict_layers": 0,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
}

PRESETS: dict[str, dict] = {"nano-4b": NANO_4B_CONFIG, "nano": NANO_CONFIG, "super": SUPER_CONFIG,
                            "ultra": ULTRA_CONFIG, "lightning": LIGHTNING_CONFIG}
