"""ModelConfig: the published M1 numbers, both HF dialects, and errors that name the field."""
import json
import os

import pytest

from m1jax.config import ModelConfig, apply_overrides, m1_layer_types

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "minimax-m1")
DATA = os.path.join(os.path.dirname(__file__), "..", "data", "minimax-m1")


def _data(name):
    for folder in (DATA, SHARED):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    pytest.skip(f"{name} not available")


def test_m1_param_counts_match_published_numbers():
    counts = ModelConfig.m1().param_counts()
    assert counts["total"] == 456_089_655_296  # spec section 1, from the shapes
    assert counts["active"] == 45_944_920_064  # "45.9B active", excluding embedding and head
    assert counts["active_with_head"] == 47_174_113_280


def test_published_config_json_reads_as_m1():
    cfg = ModelConfig.from_hf_config(_data("config.json"))
    assert cfg == ModelConfig.m1()
    assert cfg.layer_period == 8
    assert [i for i, t in enumerate(cfg.layer_types) if t == "softmax"] == list(range(7, 80, 8))


def test_index_total_size_is_bf16_plus_fp32_router():
    """The published index's total_size = 2 bytes per parameter + 2 extra bytes per router weight (fp32 router)."""
    with open(_data("model.safetensors.index.json")) as fh:
        total = json.load(fh)["metadata"]["total_size"]
    cfg = ModelConfig.m1()
    router = cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size
    assert total == 2 * cfg.param_counts()["total"] + 2 * router


@pytest.mark.parametrize("dialect", ["minimax", "transformers"])
def test_hf_dialect_round_trip(dialect):
    cfg = ModelConfig.tiny(rope_theta=5e5, linear_attn_beta=0.5)
    d = cfg.to_hf_config(dialect)
    assert ("attn_type_list" in d) == (dialect == "minimax")
    back = ModelConfig.from_hf_config(d)
    if dialect == "minimax":  # MiniMax's dialect has no block_size: the reader falls back to 256
        back = back.replace(block_size=cfg.block_size)
    assert back == cfg


@pytest.mark.parametrize("change, message", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(rotary_dim=32), "rotary_dim"),
    (dict(layer_types=("lightning",) * 7), "layer_types"),
    (dict(layer_types=("lightning",) * 7 + ("mamba",)), "layer_types"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(compute_dtype="float8"), "compute_dtype"),
    (dict(lm_head_precision="tf32"), "lm_head_precision"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_invalid_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**change)


def test_hf_config_errors():
    good = ModelConfig.tiny().to_hf_config("minimax")
    with pytest.raises(ValueError, match="unknown config keys.*'foo'"):
        ModelConfig.from_hf_config({**good, "foo": 1})
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig.from_hf_config({**good, "layer_types": ["full_attention"] * 8})
    with pytest.raises(ValueError, match="contradicts"):
        ModelConfig.from_hf_config({**good, "mlp_alpha_factor": 1.0})
    with pytest.raises(ValueError, match="shared expert"):
        ModelConfig.from_hf_config({**good, "shared_intermediate_size": 128})
    no_pattern = {k: v for k, v in good.items() if k != "attn_type_list"}
    with pytest.raises(ValueError, match="layer pattern must be explicit"):
        ModelConfig.from_hf_config(no_pattern)


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(ModelConfig.tiny(), ["compute_dtype=bfloat16", "num_hidden_layers=16", "remat=true",
                                               "lightning_implementation=none", "rope_theta=1e6"])
    assert cfg.compute_dtype == "bfloat16" and cfg.remat is True and cfg.rope_theta == 1e6
    assert cfg.layer_types == m1_layer_types(16) and cfg.lightning_implementation is None
    with pytest.raises(ValueError, match="unknown config key 'hiden_size'"):
        apply_overrides(ModelConfig.tiny(), ["hiden_size=8"])
    with pytest.raises(ValueError, match="overridden twice"):
        apply_overrides(ModelConfig.tiny(), ["remat=true", "remat=false"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(ModelConfig.tiny(), ["hidden_size=big"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(ModelConfig.tiny(), ["remat"])


def test_layer_period_of_aperiodic_pattern_is_whole_stack():
    cfg = ModelConfig.tiny(num_hidden_layers=5, layer_types=("lightning", "softmax", "lightning", "lightning",
                                                             "softmax"))
    assert cfg.layer_period == 5
