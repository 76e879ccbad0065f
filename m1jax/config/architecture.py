"""The architecture of an M1-style model: exactly what a checkpoint defines, mirroring the HF config.

Field names follow transformers' ``MiniMaxConfig`` where one exists. The defaults are the published MiniMax-M1 (456B
total, 45.9B active); ``m1jax.config.presets`` holds the smaller shapes. ``layer_types[i]`` is "lightning" or
"softmax". Nothing here says how the model is computed: that is ``m1jax.config.execution``.
"""
from __future__ import annotations

import dataclasses

from m1jax.config.base import Config, ConfigError

LIGHTNING = "lightning"
SOFTMAX = "softmax"
LAYER_TYPES = (LIGHTNING, SOFTMAX)


def m1_layer_types(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """M1's pattern: every ``period``-th layer (index % period == period-1) is softmax, the rest lightning."""
    return tuple(SOFTMAX if i % period == period - 1 else LIGHTNING for i in range(num_layers))


# DeepNorm's alpha for M1's 80 layers: (2 N)^(1/4) with N = 80 layers (MiniMax's config stores 3.5565588200778455).
M1_DEEPNORM_ALPHA = (2.0 * 80) ** 0.25


@dataclasses.dataclass(frozen=True)
class Architecture(Config):
    """Every architectural constant of an M1-style hybrid lightning/softmax MoE decoder."""
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
    linear_attn_alpha: float = M1_DEEPNORM_ALPHA
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = M1_DEEPNORM_ALPHA
    full_attn_beta: float = 1.0
    mlp_alpha: float = M1_DEEPNORM_ALPHA
    mlp_beta: float = 1.0
    postnorm: bool = True
    block_size: int = 256
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def validate(self) -> None:
        Architecture._validate_architecture(self)

    def _validate_architecture(self) -> None:
        def fail(field, msg):
            raise ConfigError(f"{type(self).__name__}.{field}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "block_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                fail(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            fail("layer_types", f"unknown layer types {bad}; expected {LAYER_TYPES}")
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
        if self.router_aux_loss_coef < 0:
            fail("router_aux_loss_coef", f"must be >= 0, got {self.router_aux_loss_coef}")

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
