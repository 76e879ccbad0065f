"""The trainer's configs and the run directory's rules: typed fields, ``--set`` reaching every field of every
section, the stored config as the base of a resume, conflicting changes refused (unless allowed), free ones not."""
import dataclasses
import typing

import pytest

from m1jax.config import ConfigError, ModelConfig
from m1jax.config.files import read_config, write_config
from m1jax.train import ResumeConflict, RunConfig, TrainConfig, check_start, resolve_configs


@pytest.mark.parametrize("make,message", [
    (lambda: TrainConfig(learning_rate="big"), "TrainConfig.learning_rate: expected a number, got str 'big'"),
    (lambda: TrainConfig(grad_accum=1.5), "TrainConfig.grad_accum: expected an integer"),
    (lambda: TrainConfig(grad_accum=0), "TrainConfig.grad_accum: must be >= 1"),
    (lambda: TrainConfig(clip_norm=0.0), "TrainConfig.clip_norm: must be > 0, or None for no clipping"),
    (lambda: TrainConfig(ce_implementation="fused"), "TrainConfig.ce_implementation: must be one of"),
    (lambda: RunConfig(batch=True), "RunConfig.batch: expected an integer, got bool True"),
    (lambda: RunConfig(steps=-1), "RunConfig.steps: must be >= 0"),
    (lambda: RunConfig(mesh="data=x"), "RunConfig.mesh: mesh axis 'data': size 'x' is not an integer"),
    (lambda: RunConfig(seed=2**32), "RunConfig.seed: must be in [0, 2**32)"),
    (lambda: RunConfig().override(["fsdp=maybe"]), "RunConfig.fsdp: expected a boolean (true/false), got 'maybe'"),
])
def test_config_type_and_value_errors(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert message in str(e.value)


def _other_value(cls, field: dataclasses.Field):
    """A valid value of ``field`` different from its default, as --set text."""
    hint = typing.get_type_hints(cls)[field.name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    default = field.default
    if field.metadata.get("choices"):
        return next(c for c in field.metadata["choices"] if c != default)
    if base is bool:
        return str(not default).lower()
    if base is int:
        return str(7 if default is None else default + 7)
    if base is float:
        return repr(0.5 if default is None else default * 2 + 0.25)
    return {"mesh": "data=2", "eval_data": "synthetic:mul", "data": "synthetic:mul"}.get(field.name, "somewhere")


def test_set_reaches_every_train_and_run_field(tmp_path):
    items, want = [], {}
    for section, cls in (("train", TrainConfig), ("run", RunConfig)):
        for field in dataclasses.fields(cls):
            text = _other_value(cls, field)
            items.append(f"{section}.{field.name}={text}")
            want[(section, field.name)] = cls().override([f"{field.name}={text}"]).to_dict()[field.name]
    items += ["model.hidden_size=48", "compute_dtype=bfloat16", "model.num_hidden_layers=3"]
    sections = resolve_configs(tmp_path, resume=False, overrides=items)
    for (section, name), value in want.items():
        assert sections[section].to_dict()[name] == value != getattr(type(sections[section])(), name), name
    model = sections["model"]
    assert (model.hidden_size, model.compute_dtype, model.num_hidden_layers) == (48, "bfloat16", 3)
    assert model.vocab_size == ModelConfig.tiny().vocab_size  # the default base is the tiny preset


def _stored_run(workdir):
    """A run directory with a checkpoint and its stored config (hidden_size 32, lr 1e-3, 50 steps)."""
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    sections = resolve_configs(workdir, resume=False, overrides=[
        "hidden_size=32", "train.learning_rate=1e-3", "run.steps=50", "run.batch=4"])
    write_config(workdir, **sections)
    return sections


def test_resume_starts_from_the_stored_config(tmp_path):
    stored = _stored_run(tmp_path)
    sections = resolve_configs(tmp_path, resume=True)
    assert sections == stored
    assert check_start(tmp_path, sections, resume=True) == []
    # free changes: the run length, the mesh, execution settings
    changed = resolve_configs(tmp_path, resume=True, overrides=["run.steps=80", "run.mesh=data=2",
                                                                  "compute_dtype=bfloat16"])
    assert (changed["run"].steps, changed["model"].compute_dtype, changed["model"].hidden_size) == (80, "bfloat16",
                                                                                                     32)
    assert check_start(tmp_path, changed, resume=True) == []
    # a preset given on resume replaces the stored model, and its architecture is compared like any change
    preset = resolve_configs(tmp_path, resume=True, model_spec="tiny")
    with pytest.raises(ResumeConflict, match=r"model.hidden_size: 32 -> 64"):
        check_start(tmp_path, preset, resume=True)


@pytest.mark.parametrize("override,line", [
    ("model.num_local_experts=8", "model.num_local_experts: 4 -> 8"),
    ("train.b2=0.999", "train.b2: 0.95 -> 0.999"),
    ("train.learning_rate=2e-3", "train.learning_rate: 0.001 -> 0.002"),
    ("run.batch=8", "run.batch: 4 -> 8"),
])
def test_conflicting_resume_refused_unless_allowed(tmp_path, override, line):
    _stored_run(tmp_path)
    sections = resolve_configs(tmp_path, resume=True, overrides=[override])
    with pytest.raises(ResumeConflict) as e:
        check_start(tmp_path, sections, resume=True)
    assert line in str(e.value) and "--allow_config_change" in str(e.value) and "\n" not in str(e.value)
    assert check_start(tmp_path, sections, resume=True, allow_config_change=True) == [line]


def test_checkpoints_without_resume_are_not_overwritten(tmp_path):
    stored = _stored_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds checkpoints .latest step 10.: resume it"):
        check_start(tmp_path, stored, resume=False)
    # no checkpoint: --resume starts afresh, from the defaults, not from a stale config.json
    (tmp_path / "checkpoints" / "10").rmdir()
    assert resolve_configs(tmp_path, resume=True)["train"] == TrainConfig()
    assert check_start(tmp_path, stored, resume=True) == []
    assert read_config(tmp_path)["train"]["learning_rate"] == 1e-3
