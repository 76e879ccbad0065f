"""The one ``config.json`` format of m1jax, and reading a model config from a preset, that format or an HF file.

Every run directory (training, RL, conversion, export) stores the exact configuration it ran with::

    {"format": "m1jax.config/1",
     "model": {"architecture": {...every Architecture field...}, "execution": {...every Execution field...}},
     "train": {...}, "rl": {...}, ...}          # the other sections of the run, each complete

``load_model_config(spec)`` takes a preset name, such a file, an HF ``config.json`` (either dialect), or a partial
file that names its base preset (``{"base": "tiny", "hidden_size": 128}``; JSON or YAML). A file that is neither
complete nor based on a preset is refused with the missing fields named: nothing is filled from the 456B defaults.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from m1jax.config.architecture import Architecture
from m1jax.config.base import Config, ConfigError
from m1jax.config.execution import Execution
from m1jax.config.hf import is_hf_config
from m1jax.config.model import PRESETS, ModelConfig

FORMAT = "m1jax.config/1"
CONFIG_FILE = "config.json"


def model_section(cfg: ModelConfig) -> dict[str, Any]:
    return {"architecture": cfg.architecture.to_dict(), "execution": cfg.execution.to_dict()}


def write_config(path: str | os.PathLike, **sections: Config | Mapping[str, Any]) -> str:
    """Write ``sections`` (``model=ModelConfig``, ``train=TrainConfig``, ...; plain mappings are written as given) as
    one config file, atomically (a temporary file renamed into place). ``path`` may be a run directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    doc: dict[str, Any] = {"format": FORMAT}
    for name, section in sections.items():
        if isinstance(section, ModelConfig):
            doc[name] = model_section(section)
        elif isinstance(section, Config):
            doc[name] = section.to_dict()
        else:
            doc[name] = dict(section)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _read_mapping(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            if path.endswith((".yaml", ".yml")):
                import yaml
                d = yaml.safe_load(fh)
            else:
                d = json.load(fh)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and yaml errors are ValueErrors
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(d).__name__}")
    return d


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The sections of an m1jax config file (``path`` may be a run directory): ``{"model": {...}, ...}``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"no config file at {path}")
    d = _read_mapping(path)
    if d.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an m1jax config file (format {d.get('format')!r}, expected {FORMAT!r})")
    return {k: v for k, v in d.items() if k != "format"}


def model_config_from_section(section: Mapping[str, Any], source: str = "config") -> ModelConfig:
    """A ``model`` section (``{"architecture": {...}, "execution": {...}}``) -> ModelConfig; both parts complete."""
    unknown = sorted(set(section) - {"architecture", "execution"})
    if unknown or "architecture" not in section:
        raise ConfigError(f"{source}: the model section needs 'architecture' (and 'execution'); got keys "
                          f"{sorted(section)}")
    arch = Architecture.from_dict(section["architecture"], source=f"{source} model.architecture")
    execution = Execution.from_dict(section.get("execution", {}), base=Execution(),
                                    source=f"{source} model.execution")
    return ModelConfig.from_parts(arch, execution)


def load_model_config(spec: str | os.PathLike) -> ModelConfig:
    """A preset name, an m1jax config file or run directory, an HF config.json, or a partial file naming its base
    preset (``"base"``) -> ModelConfig. Errors name the file and the problem."""
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        if spec in PRESETS:
            return ModelConfig.preset(spec)
        raise ConfigError(f"config {spec!r} is neither a preset ({sorted(PRESETS)}) nor an existing file")
    path = os.path.join(spec, CONFIG_FILE) if os.path.isdir(spec) else spec
    if not os.path.exists(path):
        raise ConfigError(f"{spec} is a directory without {CONFIG_FILE}")
    d = _read_mapping(path)
    if d.get("format") == FORMAT:
        if "model" not in d:
            raise ConfigError(f"{path}: no model section")
        return model_config_from_section(d["model"], path)
    if is_hf_config(d):
        return ModelConfig.from_hf_config(d)
    base = d.pop("base", None)
    if base is None:  # a complete architecture; execution settings not given keep their defaults
        unknown = sorted(set(d) - set(ModelConfig.field_names()))
        if unknown:
            raise ConfigError(f"{path}: unknown ModelConfig keys {unknown}")
        arch_names = set(Architecture.field_names())
        return model_config_from_section({"architecture": {k: v for k, v in d.items() if k in arch_names},
                                          "execution": {k: v for k, v in d.items() if k not in arch_names}}, path)
    if base not in PRESETS:
        raise ConfigError(f"{path}: base {base!r} is not a preset; choose from {sorted(PRESETS)}")
    try:  # ModelConfig.replace keeps M1's layer pattern for a new layer count, as --set does
        return ModelConfig.preset(base).replace(**d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resume_conflicts(stored: Mapping[str, Any], current: Mapping[str, Config]) -> list[str]:
    """Fields a resumed run must keep (``Config.fixed_on_resume``) whose current value differs from the stored
    config's; ``stored`` is ``read_config``'s result, ``current`` the run's sections. Returns ``section.field: a -> b``
    lines (empty: compatible). Sections or fields missing from ``stored`` count as changed."""
    lines = []
    for name, cfg in current.items():
        if isinstance(cfg, ModelConfig):
            saved_section = stored.get(name, {})
            saved = {**saved_section.get("architecture", {}), **saved_section.get("execution", {})}
        else:
            saved = stored.get(name, {})
        now = cfg.to_dict()
        for field in type(cfg).fixed_on_resume():
            if field not in saved:
                lines.append(f"{name}.{field}: not in the stored config -> {now[field]!r}")
            elif saved[field] != now[field]:
                lines.append(f"{name}.{field}: {saved[field]!r} -> {now[field]!r}")
    return lines
