"""ModelSpec: what a Nemotron 3 network is, parsed and validated from a checkpoint's `config.json`.

Two key styles exist in the wild and both are accepted:

* hub checkpoints: `hybrid_override_pattern` ("M-M*E..."), `mtp_hybrid_override_pattern`, and older
  aliases such as `mamba_n_groups`, `mamba_d_conv`, `mamba_chunk_size`, `attention_head_dim`;
* transformers >= 5: `layers_block_type` (`linear_attention`, `full_attention`, `moe`, `mlp`) and
  `mtp_layers_block_type`.

Internally a layer is one letter: M (Mamba-2), * (attention), E (MoE), - (MLP).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
LETTER_OF_NAME = {"linear_attention": MAMBA, "full_attention": ATTENTION, "moe": MOE, "mlp": MLP,
                  # legacy transformers names
                  "mamba": MAMBA, "attention": ATTENTION}
NO_LIMIT = 1e30  # how configs spell an unbounded time_step_limit
NAME_OF_LETTER = {MAMBA: "linear_attention", ATTENTION: "full_attention", MOE: "moe", MLP: "mlp"}

# config key -> older/hub aliases that mean the same thing
_ALIASES = {
    "n_groups": ("mamba_n_groups",),
    "conv_kernel": ("mamba_d_conv",),
    "chunk_size": ("mamba_chunk_size",),
    "use_conv_bias": ("mamba_conv_bias",),
    "time_step_limit": ("mamba_dt_limit",),
    "head_dim": ("attention_head_dim",),
    "use_bias": ("mamba_proj_bias",),
}


class ConfigError(ValueError):
    """A config.json value that nemo3 cannot build a network from; the message names key and value."""


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]  # one letter per layer: M * E -
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj bias
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MLP / MoE
    intermediate_size: int = 0
    mlp_bias: bool = False
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_layer_types: tuple[str, ...] = ()
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    max_position_embeddings: int = 4096
    # the config as read, for writing derived checkpoints
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def pattern(self) -> str:
        return "".join(self.layer_types)

    @property
    def mtp_pattern(self) -> str:
        return "".join(self.mtp_layer_types)

    @property
    def mamba_intermediate(self) -> int:
        """I = H * P."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: x, B, C = I + 2 G N."""
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        """in_proj output: [z (I), xBC (I + 2GN), dt (H)]."""
        return self.mamba_intermediate + self.conv_dim + self.mamba_num_heads

    @property
    def expert_dim(self) -> int:
        """Width the routed experts work in: the latent size for LatentMoE, else hidden."""
        return self.moe_latent_size or self.hidden_size

    def layers_of(self, letter: str) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == letter]

    # ---- per-sequence state ------------------------------------------------------------------
    def ssm_state_bytes(self) -> int:
        """fp32 SSM state [H, P, N] for every Mamba layer of one sequence."""
        per_layer = self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size * 4
        return per_layer * self._count_with_mtp(MAMBA)

    def _count_with_mtp(self, letter: str) -> int:
        return self.layer_types.count(letter) + self.num_nextn_predict_layers * self.mtp_layer_types.count(letter)

    def conv_state_bytes(self, dtype_bytes: int = 2) -> int:
        """Rolling conv window [conv_dim, kernel - 1] for every Mamba layer of one sequence."""
        return self.conv_dim * (self.conv_kernel - 1) * dtype_bytes * self._count_with_mtp(MAMBA)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every attention layer (MTP layers included) for one token."""
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes * self._count_with_mtp(ATTENTION)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> "ModelSpec":
        cfg = dict(config)
        for key, aliases in _ALIASES.items():
            for alias in aliases:
                if key not in cfg and alias in cfg:
                    cfg[key] = cfg[alias]
        model_type = cfg.get("model_type")
        if model_type not in (None, "nemotron_h"):
            raise ConfigError(f"{source}: model_type={model_type!r} is not a Nemotron 3 (nemotron_h) model")

        layer_types = _parse_layers(cfg, "hybrid_override_pattern", "layers_block_type", source, required=True)
        n_mtp = cfg.get("num_nextn_predict_layers") or 0
        if isinstance(n_mtp, bool) or not isinstance(n_mtp, int) or n_mtp < 0:
            raise ConfigError(f"{source}: num_nextn_predict_layers={n_mtp!r} must be a non-negative integer")
        mtp_types = _parse_layers(cfg, "mtp_hybrid_override_pattern", "mtp_layers_block_type", source,
                                  required=False) if n_mtp else ()
        if n_mtp and not mtp_types:
            raise ConfigError(f"{source}: num_nextn_predict_layers={n_mtp} needs mtp_hybrid_override_pattern "
                              "(or mtp_layers_block_type)")
        n_layers = cfg.get("num_hidden_layers")
        if n_layers is not None and n_layers != len(layer_types):
            raise ConfigError(f"{source}: num_hidden_layers={n_layers!r} does not match the {len(layer_types)} layers "
                              "of the layer pattern")
        limit = cfg.get("time_step_limit", (0.0, math.inf))
        # transformers writes {"__float__": "Infinity"}; hub configs (and to_config) write 1e30 for "no limit"
        limit = tuple(math.inf if isinstance(v, dict) or float(v) >= NO_LIMIT else float(v) for v in limit)

        names = {f.name for f in dataclasses.fields(cls)} - {"layer_types", "mtp_layer_types", "raw",
                                                             "time_step_limit"}
        kwargs = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        for required in ("vocab_size", "hidden_size"):
            if required not in kwargs:
                raise ConfigError(f"{source}: missing required key {required!r}")
        spec = cls(layer_types=layer_types, mtp_layer_types=mtp_types, time_step_limit=limit,
                   num_nextn_predict_layers=n_mtp, raw=config,
                   **{k: v for k, v in kwargs.items() if k != "num_nextn_predict_layers"})
        spec.validate(source)
        return spec

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_config(config, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        def fail(key, value, why):
            raise ConfigError(f"{source}: {key}={value!r} {why}")

        positive = ["vocab_size", "hidden_size", "layer_norm_epsilon"]
        if MAMBA in self.all_layer_types:
            positive += ["mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                         "chunk_size"]
        if ATTENTION in self.all_layer_types:
            positive += ["num_attention_heads", "num_key_value_heads", "head_dim"]
        if MLP in self.all_layer_types:
            positive += ["intermediate_size"]
        if MOE in self.all_layer_types:
            positive += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                         "topk_group", "routed_scaling_factor"]
        real_valued = {"layer_norm_epsilon", "routed_scaling_factor"}
        for key in positive:
            value = getattr(self, key)
            kinds = (int, float) if key in real_valued else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                fail(key, value, "must be a positive " + ("number" if key in real_valued else "integer"))
        if self.moe_latent_size is not None and self.moe_latent_size <= 0:
            fail("moe_latent_size", self.moe_latent_size, "must be a positive number or null")
        if self.moe_shared_expert_intermediate_size < 0:
            fail("moe_shared_expert_intermediate_size", self.moe_shared_expert_intermediate_size,
                 "must not be negative")
        if MAMBA in self.all_layer_types and self.mamba_num_heads % self.n_groups:
            fail("n_groups", self.n_groups, f"must divide mamba_num_heads={self.mamba_num_heads}")
        if ATTENTION in self.all_layer_types and self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"must divide num_attention_heads={self.num_attention_heads}")
        if MOE in self.all_layer_types:
            if self.n_routed_experts % self.n_group:
                fail("n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                fail("topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok", self.num_experts_per_tok,
                     f"must be <= n_routed_experts={self.n_routed_experts}")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                fail("num_experts_per_tok", self.num_experts_per_tok,
                     f"exceeds the {self.topk_group * per_group} experts in topk_group={self.topk_group} groups")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", True, "is not supported: Nemotron 3 has an untied lm_head")

    @property
    def all_layer_types(self) -> tuple[str, ...]:
        return self.layer_types + self.mtp_layer_types

    def to_config(self) -> dict:
        """Hub-style config.json (what NVIDIA's checkpoints and TensorRT-LLM/vLLM read)."""
        cfg = {k: v for k, v in self.raw.items() if k not in ("layers_block_type", "mtp_layers_block_type")}
        skip = {"layer_types", "mtp_layer_types", "raw", "time_step_limit"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                cfg[f.name] = getattr(self, f.name)
        cfg["model_type"] = "nemotron_h"
        cfg.setdefault("architectures", ["NemotronHForCausalLM"])
        cfg["hybrid_override_pattern"] = self.pattern
        cfg["num_hidden_layers"] = self.num_layers
        if self.num_nextn_predict_layers:
            cfg["mtp_hybrid_override_pattern"] = self.mtp_pattern
        cfg["time_step_limit"] = [self.time_step_limit[0], self.time_step_limit[1]
                                  if math.isfinite(self.time_step_limit[1]) else NO_LIMIT]
        return cfg


def _parse_layers(cfg: dict, pattern_key: str, list_key: str, source: str, required: bool) -> tuple[str, ...]:
    if cfg.get(pattern_key) is not None:
        pattern = cfg[pattern_key]
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{source}: {pattern_key}={pattern!r} must be a non-empty string of M * E -")
        for ch in pattern:
            if ch not in NAME_OF_LETTER:
                raise ConfigError(f"{source}: {pattern_key}={pattern!r} has unknown layer letter {ch!r} "
                                  "(expected M, *, E or -)")
        return tuple(pattern)
    if cfg.get(list_key) is not None:
        names = cfg[list_key]
        if not isinstance(names, list) or not names:
            raise ConfigError(f"{source}: {list_key}={names!r} must be a non-empty list")
        for name in names:
            if name not in LETTER_OF_NAME:
                raise ConfigError(f"{source}: {list_key} has unknown layer type {name!r} "
                                  f"(expected one of {sorted(NAME_OF_LETTER.values())})")
        return tuple(LETTER_OF_NAME[n] for n in names)
    if required:
        raise ConfigError(f"{source}: missing {pattern_key!r} (or {list_key!r}): the layer pattern")
    return ()
