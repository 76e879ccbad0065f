"""Model weights on disk, whatever wrote them: converted parameter directories, and the HF checkpoint conversion.

A *parameter directory* (``convert_hf``'s output) holds ``config.json`` (the m1jax config format: the architecture, the
execution settings, and where the weights came from) and ``params/<leaf name>/``, one orbax checkpoint per model
parameter (``m1jax.checkpoint.save_params_leaf``), read onto any mesh by ``m1jax.checkpoint.load_params``.

Conversion streams: each parameter is assembled from the memory-mapped HF tensors that fill it and written before
the next one starts, so host memory peaks at the largest stacked parameter, never the model. The output appears
atomically: everything is written into ``<out>.partial/`` and renamed to ``<out>`` at the end. A conversion that
failed halfway leaves ``<out>.partial/``; running it again resumes there (parameters already written are kept) when
the source and settings are the same, and refuses otherwise, naming what differs. An existing ``<out>`` is only
replaced with ``overwrite=True``, and then by renames, so a crash leaves the old or the new directory, never a mix.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Sequence

from m1jax.config import ModelConfig
from m1jax.config import files as config_files
from m1jax.safetensors_io import CheckpointError

PARAMS = "params"
PARTIAL = ".partial"


class OutputExists(CheckpointError):
    """The output directory exists (or a partial one from a different conversion) and overwriting was not asked."""


def _source_section(hf_dir: str, overrides: Sequence[str]) -> dict:
    return {"hf_dir": os.path.abspath(hf_dir), "overrides": list(overrides)}


def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, overrides: Sequence[str] = (), *,
               overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Convert the HF checkpoint directory ``hf_dir`` into the parameter directory ``out`` (module docstring).

    ``overrides``: ``key=value`` execution settings stored with the weights (``param_dtype=bfloat16`` stores bf16).
    Returns {"parameters": written now, "resumed": kept from a partial run, "peak_buffer_bytes", "seconds"}.
    Raises CheckpointError (and its OutputExists) naming the problem; the partial output stays for a resume.
    """
    from flax import nnx

    from m1jax.checkpoint import save_params_leaf
    from m1jax.convert import iter_hf_params
    from m1jax.model import abstract_model

    t0 = time.perf_counter()
    hf_dir, out = os.fspath(hf_dir), os.path.abspath(os.fspath(out))
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"HF checkpoint directory not found: {hf_dir}")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}: no config.json")
    if os.path.exists(out) and not overwrite:
        raise OutputExists(f"{out} already exists; pass overwrite (--overwrite) to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputExists(f"{out} exists and is not a directory")
    cfg = ModelConfig.from_hf_config(os.path.join(hf_dir, "config.json")).override(overrides)
    partial = out + PARTIAL
    source = _source_section(hf_dir, overrides)
    if os.path.isdir(partial):
        stored = config_files.read_config(partial)
        if stored.get("source") != source or config_files.resume_conflicts(stored, {"model": cfg}):
            if not overwrite:
                raise OutputExists(f"{partial} holds a partial conversion of {stored.get('source')}, not of "
                                   f"{source}; pass overwrite (--overwrite) to start again")
            shutil.rmtree(partial)
        else:
            log(f"resuming the partial conversion in {partial}")
    os.makedirs(os.path.join(partial, PARAMS), exist_ok=True)
    config_files.write_config(partial, model=cfg, source=source)
    _, abstract = nnx.split(abstract_model(cfg), nnx.Param)
    params_dir = os.path.join(partial, PARAMS)
    peak = written = resumed = 0
    for path, buffer in iter_hf_params(hf_dir, cfg, abstract):  # one parameter in host memory at a time
        name = ".".join(map(str, path)) + ".value"
        if os.path.isdir(os.path.join(params_dir, name)):  # finalised by orbax's rename in an earlier run
            resumed += 1
            continue
        peak, written = max(peak, buffer.nbytes), written + 1
        save_params_leaf(params_dir, name, buffer)
        log(f"  {name} {list(buffer.shape)} {buffer.dtype}")
        del buffer
    if os.path.exists(out):  # overwrite: swap by renames
        old = out + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old)
    else:
        os.rename(partial, out)
    return {"parameters": written, "resumed": resumed, "peak_buffer_bytes": peak,
            "seconds": time.perf_counter() - t0}


def params_dir_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a parameter directory (or run directory)."""
    return config_files.load_model_config(os.fspath(directory))


# ------------------------------------------------------------------------------------------------ loading
def checkpoint_kind(path: str | os.PathLike) -> str:
    """What ``path`` holds: "hf" (config.json in an HF dialect + safetensors), "params" (a parameter directory),
    "run" (a training or RL run directory: config.json + checkpoints/<step>/), "checkpoints" (a checkpoint
    directory with its own config.json, e.g. an RL policy). Raises CheckpointError naming what is missing."""
    import json

    from m1jax.checkpoint import saved_steps
    from m1jax.config.hf import is_hf_config

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    config = os.path.join(path, config_files.CONFIG_FILE)
    if not os.path.exists(config):
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint, parameter directory or run directory")
    with open(config) as fh:
        try:
            doc = json.load(fh)
        except ValueError as e:
            raise CheckpointError(f"{config} is not valid JSON: {e}") from None
    if is_hf_config(doc):
        return "hf"
    if os.path.isdir(os.path.join(path, PARAMS)):
        return "params"
    if saved_steps(os.path.join(path, "checkpoints")):
        return "run"
    if saved_steps(path):
        return "checkpoints"
    raise CheckpointError(f"{path} holds no weights: no safetensors config, no params/, no checkpoints/<step>/")


def load_weights(path: str | os.PathLike, *, mesh=None, overrides: Sequence[str] = ()):
    """(cfg, graphdef, params) from any checkpoint m1jax writes or reads (``checkpoint_kind``): an HF directory, a
    converted parameter directory, a training or RL run directory (its latest checkpoint; only the parameters are
    read), or a policy directory. The stored config says what the model is; ``overrides`` (``key=value``) change
    execution settings only (an architecture change is refused). Parameters land on ``mesh`` by the sharding rules,
    or on the first local device."""
    import jax

    from m1jax.checkpoint import load_params, restore_params, saved_steps, with_shardings
    from m1jax.model import abstract_model
    from m1jax.train import split_model
    from sharding.rules import state_shardings

    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        from flax import nnx

        from m1jax.convert import from_hf
        cfg, model = from_hf(path)
        new = cfg.override(overrides)
        _refuse_architecture_change(cfg, new)
        graphdef, params = split_model(model)
        graphdef = nnx.graphdef(abstract_model(new))
        if mesh is not None:
            params = jax.device_put(params, state_shardings(params, mesh))
        return new, graphdef, params
    stored = config_files.load_model_config(path)
    cfg = stored.override(overrides)
    _refuse_architecture_change(stored, cfg)
    graphdef, abstract = split_model(abstract_model(cfg))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    else:
        shardings = state_shardings(abstract, mesh)
    target = with_shardings(abstract, shardings)
    if kind == "params":
        return cfg, graphdef, load_params(os.path.join(path, PARAMS), target)
    root = os.path.join(path, "checkpoints") if kind == "run" else path
    step = max(saved_steps(root))
    return cfg, graphdef, restore_params(root, step, target)


def _refuse_architecture_change(before: ModelConfig, after: ModelConfig) -> None:
    changed = [n for n in before.architecture.field_names() if getattr(before, n) != getattr(after, n)]
    if changed:
        raise CheckpointError(f"overrides change the stored architecture ({changed}); only execution settings "
                              f"(e.g. compute_dtype) may change when loading weights")


def export_to_hf(path: str | os.PathLike, out: str | os.PathLike, *, dialect: str = "minimax", dtype=None,
                 max_shard_bytes: int | None = None, overwrite: bool = False) -> ModelConfig:
    """Write the weights at ``path`` (anything ``load_weights`` reads) as an HF checkpoint directory ``out``
    (config.json + safetensors, MiniMax's or transformers' names; ``dtype`` e.g. bfloat16, the published format)."""
    from flax import nnx

    from m1jax.convert import export_hf

    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise OutputExists(f"{out} already exists; pass overwrite (--overwrite) to replace it")
    cfg, graphdef, params = load_weights(path)
    export_hf(nnx.merge(graphdef, params), out, dialect=dialect, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return cfg
