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
