"""Configs: the published M1 numbers, both HF dialects, typed construction and overrides, the one config.json
format, and resume conflicts; every error names the field."""
import dataclasses
import json
import os

import pytest

from m1jax.config import (Architecture, Config, ConfigError, Execution, ModelConfig, apply_overrides,
                          apply_section_overrides, m1_layer_types, setting)
from m1jax.config import files

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "minimax-m1")  # MiniMax's published metadata files


def _data(name):
    return os.path.join(DATA, name)


def test_m1_param_counts_match_published_numbers():
    counts = ModelConfig.m1().param_counts()
    assert counts["total"] == 456_089_655_296  # the published 456B, counted from the tensor shapes (docs/model.md §1)
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


# ------------------------------------------------------------------------------------------------ typed configs
@pytest.mark.parametrize("change, message", [
    (dict(hidden_size="64"), "ModelConfig.hidden_size: expected an integer, got str"),
    (dict(hidden_size=64.0), "ModelConfig.hidden_size: expected an integer"),
    (dict(remat=1), "ModelConfig.remat: expected a boolean, got int"),
    (dict(remat="true"), "ModelConfig.remat: expected a boolean"),
    (dict(rope_theta="1e6"), "ModelConfig.rope_theta: expected a number"),
    (dict(moe_capacity_factor="1.25"), "ModelConfig.moe_capacity_factor: expected a number or None"),
    (dict(layer_types="lightning"), "ModelConfig.layer_types: expected a tuple"),
    (dict(attention_implementation="flash"), "attention_implementation: must be one of"),
])
def test_fields_are_type_checked_on_construction(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.tiny(**change)


def test_numbers_and_lists_are_normalised():
    cfg = ModelConfig.tiny(rope_theta=10000, layer_types=["lightning"] * 7 + ["softmax"])
    assert isinstance(cfg.rope_theta, float) and cfg.rope_theta == 10000.0
    assert isinstance(cfg.layer_types, tuple)
    hash(cfg)  # frozen and hashable: a static jit argument


def test_architecture_and_execution_partition_the_fields():
    arch, execution = set(Architecture.field_names()), set(Execution.field_names())
    assert not arch & execution and arch | execution == set(ModelConfig.field_names())
    cfg = ModelConfig.tiny(compute_dtype="bfloat16", remat=True)
    assert ModelConfig.from_parts(cfg.architecture, cfg.execution) == cfg
    assert cfg.to_hf_config("minimax") == ModelConfig.from_parts(cfg.architecture).to_hf_config("minimax")
    # A resumed run keeps the architecture and the stored parameter dtype; the rest of execution may change.
    assert set(ModelConfig.fixed_on_resume()) == arch | {"param_dtype"}


def test_execution_choices_match_the_kernel_apis():
    from m1jax.config import execution
    from pallas_kernels.gmm import api as gmm_api
    from pallas_kernels.lightning import api as lightning_api
    from pallas_kernels.norms import api as norms_api
    from sharding import expert_parallel
    assert execution.LIGHTNING_IMPLEMENTATIONS == lightning_api.IMPLEMENTATIONS
    assert execution.GMM_IMPLEMENTATIONS == gmm_api.IMPLEMENTATIONS
    assert execution.NORM_IMPLEMENTATIONS == norms_api.IMPLEMENTATIONS
    assert execution.MOE_TRANSPORTS == expert_parallel.TRANSPORTS


@dataclasses.dataclass(frozen=True)
class _Loop(Config):
    steps: int = 10
    learning_rate: float = 1e-3
    mode: str = setting("a", choices=("a", "b"))


def test_section_overrides_route_keys_and_refuse_ambiguity():
    sections = {"model": ModelConfig.tiny(), "loop": _Loop()}
    out = apply_section_overrides(sections, ["steps=3", "model.hidden_size=32", "loop.learning_rate=1e-2",
                                             "compute_dtype=bfloat16"])
    assert out["loop"] == _Loop(steps=3, learning_rate=1e-2) and out["model"].hidden_size == 32
    assert out["model"].compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown section 'train'"):
        apply_section_overrides(sections, ["train.steps=3"])
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        apply_section_overrides(sections, ["stepz=3"])
    with pytest.raises(ConfigError, match="_Loop.mode: must be one of"):
        apply_section_overrides(sections, ["mode=c"])
    both = {"a": _Loop(), "b": _Loop()}
    with pytest.raises(ConfigError, match="several sections.*write a.steps"):
        apply_section_overrides(both, ["steps=3"])
    with pytest.raises(ConfigError, match="overridden twice"):
        apply_section_overrides(sections, ["steps=3", "loop.steps=4"])


def test_from_dict_is_strict():
    with pytest.raises(ConfigError, match="unknown _Loop keys"):
        _Loop.from_dict({"steps": 1, "lr": 2.0, "mode": "a", "learning_rate": 1.0})
    with pytest.raises(ConfigError, match="incomplete, missing \\['mode'\\]"):
        _Loop.from_dict({"steps": 1, "learning_rate": 1.0})
    assert _Loop.from_dict({"steps": 1}, base=_Loop()) == _Loop(steps=1)


# ------------------------------------------------------------------------------------------------ config files
def test_config_file_round_trip_and_sections(tmp_path):
    cfg = ModelConfig.tiny(compute_dtype="bfloat16", hidden_size=32)
    files.write_config(tmp_path, model=cfg, loop=_Loop(steps=7), note={"seed": 3})
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["format"] == files.FORMAT and set(doc["model"]) == {"architecture", "execution"}
    assert files.load_model_config(str(tmp_path)) == cfg
    assert files.load_model_config(str(tmp_path / "config.json")) == cfg
    stored = files.read_config(tmp_path)
    assert _Loop.from_dict(stored["loop"]) == _Loop(steps=7) and stored["note"] == {"seed": 3}


def test_partial_config_files_need_a_base_preset(tmp_path):
    based = tmp_path / "based.yaml"
    based.write_text("base: tiny\nhidden_size: 32\nnum_hidden_layers: 4\ncompute_dtype: bfloat16\n")
    cfg = files.load_model_config(str(based))
    assert cfg == ModelConfig.tiny(hidden_size=32, num_hidden_layers=4, compute_dtype="bfloat16")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ConfigError, match="partial.json.*Architecture is incomplete, missing.*vocab_size"):
        files.load_model_config(str(partial))
    complete = tmp_path / "complete.json"  # a complete architecture needs no base; execution keeps its defaults
    complete.write_text(json.dumps({**ModelConfig.tiny().architecture.to_dict(), "remat": True}))
    assert files.load_model_config(str(complete)) == ModelConfig.tiny(remat=True)
    with pytest.raises(ConfigError, match="base 'huge' is not a preset"):
        (tmp_path / "bad.json").write_text(json.dumps({"base": "huge"}))
        files.load_model_config(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="neither a preset"):
        files.load_model_config(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        files.load_model_config(str(tmp_path / "broken.json"))


def test_hf_config_missing_defining_keys_is_refused():
    """An HF config is never completed from the 456B defaults: keys that define the model must be present."""
    good = ModelConfig.tiny().to_hf_config("transformers")
    for key, named in [("hidden_size", "hidden_size"), ("mlp_alpha_factor", "layernorm_mlp_alpha"),
                       ("rope_parameters", "rope_theta"), ("rms_norm_eps", "rms_norm_eps")]:
        with pytest.raises(ConfigError, match=f"HF config lacks.*{named}"):
            ModelConfig.from_hf_config({k: v for k, v in good.items() if k != key})


def test_resume_conflicts_name_the_fields(tmp_path):
    files.write_config(tmp_path, model=ModelConfig.tiny(), loop=_Loop())
    stored = files.read_config(tmp_path)
    assert files.resume_conflicts(stored, {"model": ModelConfig.tiny(compute_dtype="bfloat16", remat=True),
                                           "loop": _Loop()}) == []
    lines = files.resume_conflicts(stored, {"model": ModelConfig.tiny(hidden_size=32, param_dtype="bfloat16"),
                                            "loop": _Loop(learning_rate=1.0)})
    assert lines == ["model.hidden_size: 64 -> 32", "model.param_dtype: 'float32' -> 'bfloat16'",
                     "loop.learning_rate: 0.001 -> 1.0"]
