"""The built-in model's architecture: every Nemotron 3 feature at a few million parameters.

Mamba-2, attention (GQA, 2 KV heads like the real models) and LatentMoE layers (sigmoid routing with
grouped top-k, a shared expert), and one MTP layer with Super's pattern `*E`. Tensor parallelism of
2 and 4 divides every head, group and expert count: attention q heads 4, Mamba heads 8 in 4
groups, 8 experts in 4 routing groups (tp 4 replicates the 2 KV heads, as on the real models).
The keys are hub style (`hybrid_override_pattern`), which transformers also reads.
"""

from __future__ import annotations

from .tokenizer_train import DEFAULT_VOCAB_SIZE

BUILTIN_CONFIG: dict = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": DEFAULT_VOCAB_SIZE,
    "hidden_size": 128,
    "hybrid_override_pattern": "MEM*EMEM*E",
    "num_hidden_layers": 10,
    # attention
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "attention_bias": False,
    # Mamba-2: I = 8 x 32 = 256 (expand 2)
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "ssm_state_size": 32,
    "n_groups": 4,
    "conv_kernel": 4,
    "chunk_size": 32,
    "use_conv_bias": True,
    "use_bias": False,
    # dt is floored at 0.001 in training and by every implementation: transformers' torch path clamps
    # at time_step_min, the kernels at time_step_limit[0]; 1e30 stands for no upper limit.
    "time_step_limit": [0.001, 1e30],
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "mamba_hidden_act": "silu",
    "mamba_ssm_cache_dtype": "float32",
    # LatentMoE
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "moe_shared_expert_intermediate_size": 256,
    "n_shared_experts": 1,
    "moe_latent_size": 64,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    # MTP
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    # misc
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
}
