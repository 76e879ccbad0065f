"""Model configuration: the MiniMax-M1 architecture, its presets, and the two HF config dialects.

``ModelConfig`` is a frozen dataclass; ``ModelConfig.m1()`` is the published 456B model (spec section 1),
``ModelConfig.from_hf_config(d)`` reads MiniMax's own ``config.json`` (``attn_type_list``, ``layernorm_*_alpha``) or
transformers' ``MiniMaxConfig`` dict (``layer_types``, ``*_alpha_factor``), and ``param_counts()`` counts parameters.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

LIGHTNING = "lightning"
SOFTMAX = "softmax"
_LAYER_TYPES = (LIGHTNING, SOFTMAX)
_DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLEMENTATIONS = ("sorted", "dense", "expert_parallel")
# How expert_parallel moves tokens between shards (sharding/expert_parallel.py); None picks by backend.
MOE_TRANSPORTS = ("padded", "ragged")
# How the fp32 LM head multiplies (lm_head_fp32=True): "float32" = fp32 operands at HIGHEST precision (exact fp32);
# "bf16_3x" = the same fp32 operands through three bf16 tensor-core passes (XLA's BF16_BF16_F32_X3 algorithm: ~1e-6
# relative error, several times faster than fp32 SIMT matmuls on an H100; XLA:CPU runs it as fp32).
LM_HEAD_PRECISIONS = ("float32", "bf16_3x")
# What jax.checkpoint wraps when remat=True (m1jax/model.py): the scanned period, each decoder layer, or both.
REMAT_GRANULARITIES = ("period", "layer", "nested")


def m1_layer_types(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """M1's pattern: every ``period``-th layer (index % period == period-1) is softmax, the rest lightning."""
    return tuple(SOFTMAX if i % period == period - 1 else LIGHTNING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural constant of an M1-style model plus the numerics switches.

    Field names follow transformers' MiniMaxConfig where one exists. ``layer_types[i]`` is "lightning" or "softmax".
    """
    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9216
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    layer_types: tuple[str, ...] = m1_layer_types(80)
    rope_theta: float = 10_000_000.0
    rotary_dim: int = 64
    max_position_embeddings: int = 10_240_000
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    # DeepNorm post-norm residual: x = alpha * norm(x) + beta * sublayer(norm(x)), per sub-layer kind.
    linear_attn_alpha: float = 3.5565588200778455
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = 3.5565588200778455
    full_attn_beta: float = 1.0
    mlp_alpha: float = 3.5565588200778455
    mlp_beta: float = 1.0
    postnorm: bool = True
    block_size: int = 256
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Numerics and execution.
    lm_head_fp32: bool = True
    lm_head_precision: str = "float32"   # LM_HEAD_PRECISIONS; only read when lm_head_fp32
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    moe_implementation: str = "sorted"
    # expert_parallel only: None = dropless (a worst-case all-to-all buffer, EP x the mean load); c > 0 keeps
    # ceil(c * tokens * k / EP) rows per destination shard and drops the overflow (sharding/expert_parallel.py).
    moe_capacity_factor: float | None = None
    # expert_parallel only: "padded" (all_to_all), "ragged" (ragged_all_to_all) or None (DEFAULT_TRANSPORT: padded).
    moe_transport: str | None = None
    lightning_implementation: str | None = None
    gmm_implementation: str | None = None
    scan_layers: bool = True
    remat: bool = False
    # With remat: "period" (jax.checkpoint around each scanned period), "layer" (around each decoder layer) or
    # "nested" (both); REMAT_GRANULARITIES, m1jax/model.py.
    remat_granularity: str = "period"

    def __post_init__(self):
        # Accept lists (JSON) for layer_types but store a tuple so the config stays hashable.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(field, msg):
            raise ValueError(f"ModelConfig.{field}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "block_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in _LAYER_TYPES})
        if bad:
            fail("layer_types", f"unknown layer types {bad}; expected {_LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                                        f"num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            fail("num_experts_per_tok", f"{self.num_experts_per_tok} > num_local_experts={self.num_local_experts}")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            fail("rotary_dim", f"must be even and in [0, head_dim={self.head_dim}], got {self.rotary_dim}")
        for name in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                fail(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                fail(name, f"must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.lm_head_precision not in LM_HEAD_PRECISIONS:
            fail("lm_head_precision", f"must be one of {LM_HEAD_PRECISIONS}, got {self.lm_head_precision!r}")
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            fail("moe_implementation", f"must be one of {MOE_IMPLEMENTATIONS}, got {self.moe_implementation!r}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            fail("moe_capacity_factor", f"must be None (dropless) or > 0, got {self.moe_capacity_factor!r}")
        if self.moe_transport is not None and self.moe_transport not in MOE_TRANSPORTS:
            fail("moe_transport", f"must be None or one of {MOE_TRANSPORTS}, got {self.moe_transport!r}")
        if self.remat_granularity not in REMAT_GRANULARITIES:
            fail("remat_granularity", f"must be one of {REMAT_GRANULARITIES}, got {self.remat_granularity!r}")
        if self.router_aux_loss_coef < 0:
            fail("router_aux_loss_coef", f"must be >= 0, got {self.router_aux_loss_coef}")

    # ------------------------------------------------------------------------------------------------ presets
    @classmethod
    def m1(cls, **overrides) -> "ModelConfig":
        """The published MiniMax-M1 (40k and 80k share it): 456B total, 45.9B active."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A CPU-sized model with the M1 layer pattern (one 8-layer period) for tests and demos."""
        base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=m1_layer_types(8), rotary_dim=8,
                    max_position_embeddings=4096, block_size=16, linear_attn_alpha=4.0 ** 0.25,
                    full_attn_alpha=4.0 ** 0.25, mlp_alpha=4.0 ** 0.25)
        base.update(overrides)
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            base["layer_types"] = m1_layer_types(base["num_hidden_layers"])
        return cls(**base)

    @classmethod
    def m1_100m(cls, **overrides) -> "ModelConfig":
        """About 100M parameters with the M1 pattern (16 layers = 2 periods); used for CPU timing."""
        base = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=16, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64, intermediate_size=256, num_local_experts=8,
                    layer_types=m1_layer_types(16), rotary_dim=32, max_position_embeddings=65536,
                    linear_attn_alpha=32.0 ** 0.25, full_attn_alpha=32.0 ** 0.25, mlp_alpha=32.0 ** 0.25)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def m1_1b(cls, **overrides) -> "ModelConfig":
        """About 1B total parameters with the M1 pattern, for single-GPU benchmarks."""
        base = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=2, head_dim=64, intermediate_size=1536, num_local_experts=16,
                    layer_types=m1_layer_types(16), rotary_dim=32, max_position_embeddings=1 << 21,
                    linear_attn_alpha=32.0 ** 0.25, full_attn_alpha=32.0 ** 0.25, mlp_alpha=32.0 ** 0.25)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        presets = {"m1": cls.m1, "m1-456b": cls.m1, "tiny": cls.tiny, "m1-100m": cls.m1_100m, "m1-1b": cls.m1_1b}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return presets[name](**overrides)

    def replace(self, **changes) -> "ModelConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def attention_width(self) -> int:
        """Heads x head_dim (8192 in M1, which differs from hidden_size 6144)."""
        return self.num_attention_heads * self.head_dim

    @property
    def layer_period(self) -> int:
        """Smallest p dividing num_hidden_layers with layer_types periodic in p (8 for M1; L if aperiodic)."""
        types, n = self.layer_types, self.num_hidden_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(types[i] == types[i % p] for i in range(n)):
                return p
        return n

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``active`` (per token, excluding embedding and LM head) and
        ``active_with_head`` (active plus the LM head), and the embedding/head sizes."""
        d, w, f, e = self.hidden_size, self.attention_width, self.intermediate_size, self.num_local_experts
        kv = self.num_key_value_heads * self.head_dim
        lightning = d * 3 * w + d * w + w + w * d          # qkv, output gate, norm, out_proj
        softmax = d * w + 2 * d * kv + w * d                # q, k, v, o
        expert = 3 * d * f
        router = d * e
        norms = 2 * d
        n_light = sum(t == LIGHTNING for t in self.layer_types)
        n_soft = self.num_hidden_layers - n_light
        layers_total = n_light * lightning + n_soft * softmax + self.num_hidden_layers * (e * expert + router + norms)
        layers_active = (n_light * lightning + n_soft * softmax
                         + self.num_hidden_layers * (self.num_experts_per_tok * expert + router + norms))
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        total = embed + head + layers_total + d  # + final norm
        active = layers_active + d
        return {"total": total, "active": active, "active_with_head": active + self.vocab_size * d,
                "embedding": embed, "lm_head": head}

    # ------------------------------------------------------------------------------------------------ HF dialects
    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
        """Read MiniMax's ``config.json`` dialect or transformers' ``MiniMaxConfig`` dict (or a path to either).

        Unknown keys raise; keys both dialects carry must agree. ``overrides`` set execution fields
        (compute_dtype, moe_implementation, ...).
        """
        if not isinstance(d, Mapping):
            with open(d) as fh:
                d = json.load(fh)
        return cls(**{**_hf_to_fields(dict(d)), **overrides})

    def to_hf_config(self, dialect: str = "minimax") -> dict[str, Any]:
        """The config as MiniMax's ``config.json`` (``dialect="minimax"``) or transformers' dict ("transformers")."""
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                      intermediate_size=self.intermediate_size, num_local_experts=self.num_local_experts,
                      num_experts_per_tok=self.num_experts_per_tok, max_position_embeddings=self.max_position_embeddings,
                      rms_norm_eps=self.rms_norm_eps, router_aux_loss_coef=self.router_aux_loss_coef,
                      tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu", rotary_dim=self.rotary_dim,
                      initializer_range=self.initializer_range, router_jitter_noise=0.0, sliding_window=None)
        if dialect == "minimax":
            return dict(common, model_type="minimax_m1", architectures=["MiniMaxM1ForCausalLM"],
                        attn_type_list=[int(t == SOFTMAX) for t in self.layer_types], rope_theta=self.rope_theta,
                        postnorm=self.postnorm, shared_intermediate_size=0,
                        **{f"layernorm_{hf}_{ab}": getattr(self, f"{ours}_{ab}")
                           for hf, ours in _ALPHA_NAMES for ab in ("alpha", "beta")})
        if dialect == "transformers":
            if not self.postnorm:
                raise ValueError("transformers' MiniMax hard-codes postnorm=True; this config has postnorm=False")
            return dict(common, model_type="minimax", architectures=["MiniMaxForCausalLM"],
                        layer_types=["full_attention" if t == SOFTMAX else "linear_attention"
                                     for t in self.layer_types],
                        rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                        block_size=self.block_size,
                        **{f"{tf}_{ab}_factor": getattr(self, f"{ours}_{ab}")
                           for tf, ours in _FACTOR_NAMES for ab in ("alpha", "beta")})
        raise ValueError(f"dialect must be 'minimax' or 'transformers', got {dialect!r}")


_ALPHA_NAMES = (("linear_attention", "linear_attn"), ("full_attention", "full_attn"), ("mlp", "mlp"))
_FACTOR_NAMES = (("linear_attn", "linear_attn"), ("full_attn", "full_attn"), ("mlp", "mlp"))

# Keys that map one-to-one onto a field of the same name.
_SAME_NAME = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
              "rms_norm_eps", "router_aux_loss_coef", "tie_word_embeddings", "rotary_dim", "postnorm", "block_size",
              "initializer_range")
# Keys carried by HF configs that do not change the computation (generation defaults, bookkeeping, training-only
# switches whose M1 value is the only supported one is checked separately below).
_IGNORED = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits", "attention_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "tie_encoder_decoder",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "cross_attention_hidden_size",
    "add_cross_attention", "is_decoder", "finetuning_task", "_name_or_path", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "torchscript", "_attn_implementation_autoset", "base_model_tp_plan", "base_model_pp_plan",
    "base_model_ep_plan", "shared_moe_mode",
})


def _hf_to_fields(d: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    seen: set[str] = set()

    def take(key):
        seen.add(key)
        return d[key]

    for key in _SAME_NAME:
        if key in d and d[key] is not None:
            fields[key] = take(key)
    if "head_dim" not in fields and "hidden_size" in fields and "num_attention_heads" in fields:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]

    # Layer pattern: attn_type_list (0 lightning, 1 softmax) and/or layer_types (linear/full_attention).
    patterns = []
    if "attn_type_list" in d:
        codes = take("attn_type_list")
        if any(c not in (0, 1) for c in codes):
            raise ValueError(f"attn_type_list: entries must be 0 (lightning) or 1 (softmax), got {sorted(set(codes))}")
        patterns.append(("attn_type_list", tuple(SOFTMAX if c == 1 else LIGHTNING for c in codes)))
    if d.get("layer_types") is not None:
        names = take("layer_types")
        mapping = {"linear_attention": LIGHTNING, "full_attention": SOFTMAX}
        unknown = sorted({n for n in names if n not in mapping})
        if unknown:
            raise ValueError(f"layer_types: unknown entries {unknown}; expected linear_attention/full_attention")
        patterns.append(("layer_types", tuple(mapping[n] for n in names)))
    elif "layer_types" in d:
        seen.add("layer_types")
    if len(patterns) == 2 and patterns[0][1] != patterns[1][1]:
        raise ValueError("attn_type_list and layer_types disagree about the layer pattern")
    if patterns:
        fields["layer_types"] = patterns[0][1]
    elif "num_hidden_layers" in fields:
        raise ValueError("config has neither attn_type_list nor layer_types: the layer pattern must be explicit "
                         "(transformers' default alternates full/linear, which is not M1's pattern)")

    # DeepNorm alpha/beta: MiniMax 'layernorm_<kind>_<alpha|beta>' or transformers '<kind>_<alpha|beta>_factor'.
    for (hf, ours), (tf, _) in zip(_ALPHA_NAMES, _FACTOR_NAMES):
        for ab in ("alpha", "beta"):
            values = [take(k) for k in (f"layernorm_{hf}_{ab}", f"{tf}_{ab}_factor") if k in d]
            if len(values) == 2 and values[0] != values[1]:
                raise ValueError(f"layernorm_{hf}_{ab}={values[0]} contradicts {tf}_{ab}_factor={values[1]}")
            if values:
                fields[f"{ours}_{ab}"] = float(values[0])

    thetas = []
    if "rope_theta" in d:
        thetas.append(float(take("rope_theta")))
    if d.get("rope_parameters") is not None:
        rope = take("rope_parameters")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.rope_type={rope.get('rope_type')!r} is not supported (M1 uses default)")
        if "rope_theta" in rope:
            thetas.append(float(rope["rope_theta"]))
        if "partial_rotary_factor" in rope and "rotary_dim" not in fields:
            fields["rotary_dim"] = int(round(rope["partial_rotary_factor"] * fields.get("head_dim", 0)))
    elif "rope_parameters" in d:
        seen.add("rope_parameters")
    if len(set(thetas)) > 1:
        raise ValueError(f"rope_theta values disagree: {thetas}")
    if thetas:
        fields["rope_theta"] = thetas[0]
    if "partial_rotary_factor" in d and "rotary_dim" not in fields:
        fields["rotary_dim"] = int(round(take("partial_rotary_factor") * fields.get("head_dim", 0)))
    elif "partial_rotary_factor" in d:
        seen.add("partial_rotary_factor")
    if "rotary_dim" not in fields and "head_dim" in fields:
        fields["rotary_dim"] = fields["head_dim"]  # transformers' behaviour when nothing says otherwise

    # Switches whose only supported value is M1's.
    def require(key, ok, what):
        if key in d:
            value = take(key)
            if not ok(value):
                raise ValueError(f"{key}={value!r} is not supported: {what}")

    require("hidden_act", lambda v: v == "silu", "M1 uses silu")
    require("shared_intermediate_size", lambda v: not v, "M1 has no shared expert")
    require("router_jitter_noise", lambda v: not v, "router jitter is not implemented (M1 uses 0)")
    require("sliding_window", lambda v: v is None, "M1's softmax attention is full causal")

    unknown = sorted(k for k in d if k not in seen and k not in _IGNORED)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    return fields


def _coerce(field: dataclasses.Field, text: str):
    """Parse ``text`` for a ModelConfig field, typed by its annotation (strings under postponed evaluation)."""
    kind = str(field.type)
    low = text.strip().lower()
    if "None" in kind and low in ("none", "null"):
        return None
    if kind.startswith("bool"):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name}: expected a boolean, got {text!r}")
    if kind.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{field.name}: expected an integer, got {text!r}") from None
    if kind.startswith("float"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{field.name}: expected a number, got {text!r}") from None
    if kind.startswith("tuple"):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    return text


def apply_overrides(cfg: ModelConfig, overrides: list[str] | tuple[str, ...]) -> ModelConfig:
    """Apply ``key=value`` strings (e.g. from repeated ``--set`` flags), type-checked against the field types.

    Unknown keys, malformed items and keys given twice raise ValueError naming them.
    """
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"unknown config key {key!r} in override {item!r}; known keys: {sorted(fields)}")
        if key in changes:
            raise ValueError(f"config key {key!r} is overridden twice")
        changes[key] = _coerce(fields[key], text)
    if "num_hidden_layers" in changes and "layer_types" not in changes:
        changes["layer_types"] = m1_layer_types(changes["num_hidden_layers"], min(8, changes["num_hidden_layers"]))
    return cfg.replace(**changes)
