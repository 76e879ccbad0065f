"""A run directory's rules: which configuration a run starts from, when it may resume, and what it stores.

``<workdir>/config.json`` (``m1jax.config.files``) holds the exact sections (``model``, ``train``, ``run``) of the
latest start; ``<workdir>/checkpoints/<step>`` the orbax checkpoints; ``metrics.jsonl`` and ``tensorboard/`` the
metrics.

* A directory with checkpoints is continued only when asked (``resume``); otherwise it is refused, so a second run
  never overwrites the first by accident. ``resume`` on a directory without checkpoints starts afresh.
* A resumed run starts from the stored sections; what the user gives (a model config, ``section.key=value``
  overrides) goes on top. A change to a field a run must keep (``Config.fixed_on_resume``: the architecture, the
  optimizer, the schedule, the data, the batch) is refused with the fields named, unless ``allow_config_change``;
  fields marked ``resume=False`` (execution settings, run length, mesh, cadences) may change freely.
"""
from __future__ import annotations

import os
import tempfile
from typing import Mapping, Sequence

from m1jax.checkpoint import saved_steps
from m1jax.config import Config, ConfigError, apply_section_overrides
from m1jax.config.files import (CONFIG_FILE, load_model_config, model_config_from_section, read_config,
                                resume_conflicts)
from m1jax.train.config import RunConfig, TrainConfig

CHECKPOINTS = "checkpoints"
DEFAULT_MODEL = "tiny"


class ResumeConflict(ConfigError):
    """A resumed run would change settings fixed for the run directory."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS)


def check_workdir(workdir: str | os.PathLike) -> None:
    """ConfigError (one line) unless ``workdir`` is, or can be created as, a directory this process can write in
    (creates it)."""
    workdir = os.path.abspath(os.fspath(workdir))
    for path in (workdir, checkpoint_dir(workdir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"work directory: {path} is a file, not a directory; give a directory (new or a run's)")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"work directory {workdir} cannot be written ({e.strerror or e}); give a directory you "
                          f"can write in") from None


def is_resuming(workdir: str | os.PathLike, resume: bool) -> bool:
    """Whether a run asked to ``resume`` here continues a checkpoint (rather than starting afresh)."""
    return bool(resume and saved_steps(checkpoint_dir(workdir)))


def _stored(workdir) -> dict | None:
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    return read_config(path) if os.path.exists(path) else None


def resolve_configs(workdir: str | os.PathLike, *, resume: bool, model_spec: str | None = None,
                    overrides: Sequence[str] = ()) -> dict[str, Config]:
    """The run's sections ``{"model": ModelConfig, "train": TrainConfig, "run": RunConfig}``.

    Base: the stored sections when resuming a directory that has them, else the model ``model_spec`` names (a
    preset or file; default ``tiny``) and the defaults. ``model_spec``, when given, replaces the base model; the
    ``overrides`` (``section.key=value`` or an unambiguous ``key=value``) are applied last.
    """
    stored = _stored(workdir) if is_resuming(workdir, resume) else None
    source = f"{os.fspath(workdir)}/{CONFIG_FILE}"
    if stored is not None:
        model = (model_config_from_section(stored["model"], source) if model_spec is None
                 else load_model_config(model_spec))
        train = TrainConfig.from_dict(stored.get("train", {}), base=TrainConfig(), source=source)
        run = RunConfig.from_dict(stored.get("run", {}), base=RunConfig(), source=source)
    else:
        model, train, run = load_model_config(model_spec or DEFAULT_MODEL), TrainConfig(), RunConfig()
    return apply_section_overrides({"model": model, "train": train, "run": run}, overrides)


def check_start(workdir: str | os.PathLike, sections: Mapping[str, Config], *, resume: bool,
                allow_config_change: bool = False) -> list[str]:
    """Raise (ConfigError / ResumeConflict, one line) unless a run with ``sections`` may start in ``workdir``;
    returns the fixed fields an allowed resume changes (``section.field: old -> new``). Creates ``workdir``."""
    check_workdir(workdir)
    steps = saved_steps(checkpoint_dir(workdir))
    if not steps:
        return []
    if not resume:
        raise ConfigError(f"{checkpoint_dir(workdir)} already holds checkpoints (latest step {steps[-1]}): resume "
                          f"it (--resume) or use a new work directory")
    conflicts = resume_conflicts(_stored(workdir) or {}, sections)
    if conflicts and not allow_config_change:
        raise ResumeConflict(f"resuming {os.fspath(workdir)} would change settings fixed for the run: "
                             f"{'; '.join(conflicts)} (allow it with --allow_config_change)")
    return conflicts
