"""A policy on disk: an orbax checkpoint of the params plus the model's ``config.json`` (m1jax.config.files).

``save_policy`` writes the pretrained starting point of RL runs (reused by every arm of a benchmark grid);
``load_policy`` reads it back onto one device or a mesh.
"""
from __future__ import annotations

import os
import shutil

import jax

from m1jax.checkpoint import Checkpointer, with_shardings
from m1jax.config import ModelConfig
from m1jax.config.files import load_model_config, write_config
from m1jax.model import abstract_model
from m1jax.train import split_model
from sharding.rules import state_shardings


def save_policy(directory: str, cfg: ModelConfig, params) -> str:
    """Write ``params`` (step 0) and ``cfg`` to ``directory``. Returns its absolute path.

    A policy already in ``directory`` (an earlier run with the same workdir) is replaced: the new one is written
    beside it and swapped in by renames, so a crash leaves the old or the new policy, never a mix. Every process
    calls it (orbax writes each process's shards); process 0 renames.
    """
    directory = os.path.abspath(directory)
    writing, old = directory + ".writing", directory + ".old"
    primary = jax.process_index() == 0
    if primary:
        for leftover in (writing, old):  # from a run that crashed mid-swap
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier("policy-clean")
    checkpointer = Checkpointer(writing, max_to_keep=1, async_save=False)
    checkpointer.save(0, {"params": params}, force=True)
    checkpointer.close()
    if primary:
        write_config(writing, model=cfg)
        if os.path.exists(directory):
            os.rename(directory, old)
        os.rename(writing, directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier("policy-saved")
    return directory


def load_policy(directory: str, *, mesh: jax.sharding.Mesh | None = None, **config_overrides):
    """(cfg, graphdef, params) from ``save_policy``'s directory (its latest step), read onto the logical-axis
    shardings on ``mesh`` or onto the first device. ``config_overrides`` replace config fields that change no
    parameter (compute_dtype, lm_head_fp32, ...)."""
    cfg = load_model_config(directory).replace(**config_overrides)
    graphdef, abstract = split_model(abstract_model(cfg))
    if mesh is None:
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                                           abstract)
    else:
        shardings = state_shardings(abstract, mesh)
    checkpointer = Checkpointer(directory, async_save=False)
    state, _ = checkpointer.restore({"params": with_shardings(abstract, shardings)})
    checkpointer.close()
    return cfg, graphdef, state["params"]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
