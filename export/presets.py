"""Hub-style config.json dicts of the released Nemotron 3 models, for planning without a checkpoint.

Shapes as in DESIGN.md's table. The layer patterns are the real ones:

* Nano: `hybrid_override_pattern` of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16's config.json
  (52 layers: 23 M, 23 E, 6 *); the config below is that file's architecture keys.
* Super: the pattern of nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16 (88 layers: 40 M, 40 E, 8 *)
  as quoted, with that checkpoint's safetensors parameter total (123,611,033,088, which these shapes
  reproduce exactly; tests/test_planner.py checks it), by a public parameter-count test. Keys not
  needed for shapes or state (routing groups, token ids) are left at nemo3's defaults.
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

PRESETS: dict[str, dict] = {"nano": NANO_CONFIG, "super": SUPER_CONFIG}
