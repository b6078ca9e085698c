"""Hub-style config.json dicts of the Nemotron 3 family, for planning without a checkpoint.

Every entry is a `nemotron_h` config as its hub checkpoint publishes it, in that checkpoint's own key style, with
the architecture keys of the published file (training-only and tokenizer keys are left out). Where each comes from:

* nano (nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16): the config.json of its NVFP4 release
  (nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4 @ 6efb4a2a, same architecture), as a public C++ test header
  transcribes it verbatim; a JAX port's test (NEMOTRON3_30B_JSON) quotes the same file, and NVIDIA's
  Megatron-Bridge `Nemotron3NanoProvider` (src/megatron/bridge/models/nemotronh/nemotron_h_provider.py
  @ 160ccccb) has the same shapes and routing. 52 layers: 23 M, 23 E, 6 *.
* super (nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16): the config.json of its NVFP4 release
  (nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4 @ 4f0cf9da), transcribed verbatim by the same test header,
  and `Nemotron3SuperProvider` in the same Megatron-Bridge file; 88 layers: 40 M, 40 E, 8 *, MTP `*E`. These shapes reproduce the BF16 checkpoint's safetensors parameter
  total, 123,611,033,088 (tests/test_planner.py).
* lightning (nvidia/NVIDIA-Nemotron-3.5-Lightning-30B-A3B-BF16): published in transformers-5 style
  (`layers_block_type`, `mtp_layers_block_type`, `moe_latent_size: null`); a public parity script that diffed
  it position by position against Nano's pattern found every architecture key and the 52-layer order equal to
  Nano's, plus one MTP layer (`attention`, `moe`). Megatron-Bridge's recipe for it
  (src/megatron/bridge/recipes/nemotronh/nemotron_3_5_lightning.py, HF revision b3caaabe) builds Nano's
  architecture with MTP `*E`. max_position_embeddings 262144 as NVIDIA's NeMo Customizer model reference
  lists it (docs.nvidia.com/nemo-helix/latest/documentation/customizer-reference/models/llama-nemotron); the
  1M context is the model card's, as Nano's config also says 262144.
* ultra (nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-BF16): transformers-5 style. Table 1 of NVIDIA's Ultra
  technical report (as NVIDIA-NeMo/Nemotron skills/nemotron-ultra/paper/architecture.md @ a07d43d9 records
  it): 108 layers, hidden 8192, 64 query / 2 KV heads of 128, Mamba 256 heads x 64, state 128, 8 groups,
  expert width 5120, shared expert 10240, 512 experts top-22 in a 2048 latent. The layer order (attention at
  7, 14, 23, 32, 39, 48, 57, 64, 73, 82, 89, 98, Mamba/MoE alternating between: 48 M, 48 E, 12 *), MTP
  (`attention`, `moe`), routed_scaling_factor 5.0, n_group 1 / topk_group 1 and intermediate_size 5120 as
  public loaders pin the published config.json (a validator pinned to
  nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-NVFP4 @ 183968f8 by its SHA-256; willccbb/miles
  scripts/models/nemotron-3-ultra-550b-a55b.sh @ 176722dd).
* nano-4b (nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16): a dense hybrid (M, -, *), 42 layers: 21 M, 17 -, 4 *.
  NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/recipes/nemotronh/h100/nemotron_3_nano_4b.py @ 501e321c
  ("the exact dense Nemotron 3 Nano 4B architecture", HF revision dfaf35de): hidden 3136, FFN 12544, 40 query /
  8 KV heads of 128, Mamba 96 heads x 80, state 128, 8 groups, relu2, untied embeddings; the same values and
  pattern are quoted from the config.json by several public loaders' tests, which also give chunk_size 256
  and max_position_embeddings 262144. NVIDIA's ModelOpt recipe for it names the MLP `down_proj` of exactly
  these 17 `-` layers, and these shapes give its hub page's parameter count, 3,973,556,832
  (tests/test_family.py).
"""

from __future__ import annotations

# transformers-5 `layers_block_type` names of the hybrid pattern's letters
_BLOCK_TYPES = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}

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
    "intermediate_size": 2688,
    "mlp_bias": False,
    "n_routed_experts": 512,
    "num_experts_per_tok": 22,
    "moe_intermediate_size": 2688,
    "moe_shared_expert_intermediate_size": 5376,
    "moe_latent_size": 1024,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 5.0,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
}

LIGHTNING_CONFIG: dict = {
    **{key: value for key, value in NANO_CONFIG.items() if key != "hybrid_override_pattern"},
    "layers_block_type": [_BLOCK_TYPES[c] for c in NANO_CONFIG["hybrid_override_pattern"]],
    "moe_latent_size": None,
    "num_nextn_predict_layers": 1,
    "mtp_layers_block_type": ["attention", "moe"],
}

ULTRA_CONFIG: dict = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 8192,
    "num_hidden_layers": 108,
    "layers_block_type": [_BLOCK_TYPES[c] for c in
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
    "intermediate_size": 5120,
    "mlp_bias": False,
    "n_routed_experts": 512,
    "num_experts_per_tok": 22,
    "moe_intermediate_size": 5120,
    "moe_shared_expert_intermediate_size": 10240,
    "moe_latent_size": 2048,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
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
    "hidden_size": 3136,
    "num_hidden_layers": 42,
    "hybrid_override_pattern": "M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-",
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "attention_bias": False,
    "mamba_num_heads": 96,
    "mamba_head_dim": 80,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 256,
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_ssm_cache_dtype": "float32",
    "intermediate_size": 12544,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "num_nextn_predict_layers": 0,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
}

PRESETS: dict[str, dict] = {"nano-4b": NANO_4B_CONFIG, "nano": NANO_CONFIG, "super": SUPER_CONFIG,
                            "ultra": ULTRA_CONFIG, "lightning": LIGHTNING_CONFIG}
