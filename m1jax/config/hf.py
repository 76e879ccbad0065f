"""The two HF config dialects of MiniMax-M1: MiniMax's own ``config.json`` and transformers' ``MiniMaxConfig`` dict.

* MiniMax's (the published checkpoint): ``attn_type_list`` (0 lightning, 1 softmax), ``layernorm_<kind>_<alpha|beta>``,
  ``rotary_dim``, ``rope_theta``.
* transformers': ``layer_types`` (linear_attention / full_attention), ``<kind>_<alpha|beta>_factor``,
  ``rope_parameters``; it ignores ``rotary_dim`` (rotates the whole head).

Reading is strict: unknown keys raise, keys both dialects carry must agree, and every key that defines the
computation must be present (a file is never completed from the 456B defaults). Only keys with a documented default
may be absent: ``head_dim`` (hidden_size / heads), ``rotary_dim`` (head_dim: transformers' behaviour), ``block_size``
(256; it changes no result), ``postnorm`` (True: transformers hard-codes it), ``tie_word_embeddings`` (False),
``initializer_range`` (0.02; initialisation only) and ``router_aux_loss_coef`` (0.001, as both dialects default).
"""
from __future__ import annotations

from typing import Any

from m1jax.config.architecture import LIGHTNING, SOFTMAX, Architecture
from m1jax.config.base import ConfigError

_ALPHA_NAMES = (("linear_attention", "linear_attn"), ("full_attention", "full_attn"), ("mlp", "mlp"))
_FACTOR_NAMES = (("linear_attn", "linear_attn"), ("full_attn", "full_attn"), ("mlp", "mlp"))

# Keys that map one-to-one onto a field of the same name.
_SAME_NAME = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
              "rms_norm_eps", "router_aux_loss_coef", "tie_word_embeddings", "rotary_dim", "postnorm", "block_size",
              "initializer_range")
# Keys with no documented default: a config without them does not define the model.
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
            "rms_norm_eps")
# Keys carried by HF configs that do not change the computation (generation defaults, bookkeeping).
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


def is_hf_config(d: dict) -> bool:
    """Whether a mapping is an HF config (either dialect) rather than m1jax's own format."""
    return any(k in d for k in ("model_type", "attn_type_list", "architectures"))


def architecture_fields_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """Architecture field values of an HF config dict of either dialect (strict; see the module docstring)."""
    fields: dict[str, Any] = {}
    seen: set[str] = set()

    def take(key):
        seen.add(key)
        return d[key]

    missing = [k for k in REQUIRED if d.get(k) is None]
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
            raise ConfigError(f"attn_type_list: entries must be 0 (lightning) or 1 (softmax), got {sorted(set(codes))}")
        patterns.append(("attn_type_list", tuple(SOFTMAX if c == 1 else LIGHTNING for c in codes)))
    if d.get("layer_types") is not None:
        names = take("layer_types")
        mapping = {"linear_attention": LIGHTNING, "full_attention": SOFTMAX}
        unknown = sorted({n for n in names if n not in mapping})
        if unknown:
            raise ConfigError(f"layer_types: unknown entries {unknown}; expected linear_attention/full_attention")
        patterns.append(("layer_types", tuple(mapping[n] for n in names)))
    elif "layer_types" in d:
        seen.add("layer_types")
    if len(patterns) == 2 and patterns[0][1] != patterns[1][1]:
        raise ConfigError("attn_type_list and layer_types disagree about the layer pattern")
    if patterns:
        fields["layer_types"] = patterns[0][1]
    elif "num_hidden_layers" in fields:
        raise ConfigError("config has neither attn_type_list nor layer_types: the layer pattern must be explicit "
                          "(transformers' default alternates full/linear, which is not M1's pattern)")

    # DeepNorm alpha/beta: MiniMax 'layernorm_<kind>_<alpha|beta>' or transformers '<kind>_<alpha|beta>_factor'.
    for (hf, ours), (tf, _) in zip(_ALPHA_NAMES, _FACTOR_NAMES):
        for ab in ("alpha", "beta"):
            keys = (f"layernorm_{hf}_{ab}", f"{tf}_{ab}_factor")
            values = [take(k) for k in keys if k in d]
            if len(values) == 2 and values[0] != values[1]:
                raise ConfigError(f"{keys[0]}={values[0]} contradicts {keys[1]}={values[1]}")
            if values:
                fields[f"{ours}_{ab}"] = float(values[0])
            else:
                missing.append(f"{keys[0]} (or {keys[1]})")

    thetas = []
    if "rope_theta" in d:
        thetas.append(float(take("rope_theta")))
    if d.get("rope_parameters") is not None:
        rope = take("rope_parameters")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope.get('rope_type')!r} is not supported (M1 uses "
                              "default)")
        if "rope_theta" in rope:
            thetas.append(float(rope["rope_theta"]))
        if "partial_rotary_factor" in rope and "rotary_dim" not in fields:
            fields["rotary_dim"] = int(round(rope["partial_rotary_factor"] * fields.get("head_dim", 0)))
    elif "rope_parameters" in d:
        seen.add("rope_parameters")
    if len(set(thetas)) > 1:
        raise ConfigError(f"rope_theta values disagree: {thetas}")
    if thetas:
        fields["rope_theta"] = thetas[0]
    else:
        missing.append("rope_theta (or rope_parameters.rope_theta)")
    if "partial_rotary_factor" in d and "rotary_dim" not in fields:
        fields["rotary_dim"] = int(round(take("partial_rotary_factor") * fields.get("head_dim", 0)))
    elif "partial_rotary_factor" in d:
        seen.add("partial_rotary_factor")
    if "rotary_dim" not in fields and "head_dim" in fields:
        fields["rotary_dim"] = fields["head_dim"]  # transformers' behaviour when nothing says otherwise
    if missing:
        raise ConfigError(f"HF config lacks {missing}: these define the model and have no default")

    # Switches whose only supported value is M1's.
    def require(key, ok, what):
        if key in d:
            value = take(key)
            if not ok(value):
                raise ConfigError(f"{key}={value!r} is not supported: {what}")

    require("hidden_act", lambda v: v == "silu", "M1 uses silu")
    require("shared_intermediate_size", lambda v: not v, "M1 has no shared expert")
    require("router_jitter_noise", lambda v: not v, "router jitter is not implemented (M1 uses 0)")
    require("sliding_window", lambda v: v is None, "M1's softmax attention is full causal")

    unknown = sorted(k for k in d if k not in seen and k not in _IGNORED)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}")
    defaults = {"block_size": 256, "postnorm": True, "tie_word_embeddings": False, "initializer_range": 0.02,
                "router_aux_loss_coef": 0.001}
    return {**defaults, **fields}


def architecture_to_hf(arch: Architecture, dialect: str = "minimax") -> dict[str, Any]:
    """The architecture as MiniMax's ``config.json`` (``dialect="minimax"``) or transformers' dict."""
    common = dict(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                  num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                  num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
                  intermediate_size=arch.intermediate_size, num_local_experts=arch.num_local_experts,
                  num_experts_per_tok=arch.num_experts_per_tok, max_position_embeddings=arch.max_position_embeddings,
                  rms_norm_eps=arch.rms_norm_eps, router_aux_loss_coef=arch.router_aux_loss_coef,
                  tie_word_embeddings=arch.tie_word_embeddings, hidden_act="silu", rotary_dim=arch.rotary_dim,
                  initializer_range=arch.initializer_range, router_jitter_noise=0.0, sliding_window=None)
    if dialect == "minimax":
        return dict(common, model_type="minimax_m1", architectures=["MiniMaxM1ForCausalLM"],
                    attn_type_list=[int(t == SOFTMAX) for t in arch.layer_types], rope_theta=arch.rope_theta,
                    postnorm=arch.postnorm, shared_intermediate_size=0,
                    **{f"layernorm_{hf}_{ab}": getattr(arch, f"{ours}_{ab}")
                       for hf, ours in _ALPHA_NAMES for ab in ("alpha", "beta")})
    if dialect == "transformers":
        if not arch.postnorm:
            raise ConfigError("transformers' MiniMax hard-codes postnorm=True; this config has postnorm=False")
        return dict(common, model_type="minimax", architectures=["MiniMaxForCausalLM"],
                    layer_types=["full_attention" if t == SOFTMAX else "linear_attention" for t in arch.layer_types],
                    rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
                    block_size=arch.block_size,
                    **{f"{tf}_{ab}_factor": getattr(arch, f"{ours}_{ab}")
                       for tf, ours in _FACTOR_NAMES for ab in ("alpha", "beta")})
    raise ConfigError(f"dialect must be 'minimax' or 'transformers', got {dialect!r}")
