"""Orbax checkpoints of the training state: async saves, keep-N, resharding restore, atomicity.

``Checkpointer(directory)`` wraps ``orbax.checkpoint.CheckpointManager`` (the stable v0 API). A step holds two items:
``state`` (every array of a ``TrainState``: step, params, optimizer state, rng; flattened to a
``{"params.embed_tokens.embedding.value": array}`` dict so the on-disk names do not depend on pytree node classes) and
``data`` (each process's data-loader state, one JSON file per process: ``data/process_<i>.json``). ``restore``
reads the arrays onto the shardings carried by the abstract state's ``ShapeDtypeStruct.sharding``, so a checkpoint
written on one mesh restores on any other mesh, device count or process count, and returns the data states of every
process that saved (a loader keyed by global row picks its rows from them).

Atomicity comes from orbax: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>`` only
when every process has finished writing, and temporary directories are never listed as steps. A step whose files are
damaged afterwards fails to restore with ``CheckpointError`` naming its path.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from m1jax.safetensors_io import CheckpointError

STATE, DATA = "state", "data"


def _flat_names(tree) -> tuple[list[str], Any]:
    """Leaf names (dotted key paths) and the treedef of ``tree``."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in paths]
    if len(set(names)) != len(names):
        raise ValueError("pytree leaves do not have unique key paths")
    return names, treedef


def flatten_state(tree) -> dict[str, Any]:
    """pytree -> {dotted key path: leaf}."""
    names, _ = _flat_names(tree)
    return dict(zip(names, jax.tree_util.tree_leaves(tree)))


def unflatten_state(flat: dict[str, Any], like) -> Any:
    """Inverse of ``flatten_state`` given a tree of the same structure (e.g. the abstract state)."""
    names, treedef = _flat_names(like)
    missing = [n for n in names if n not in flat]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} arrays of the target state, e.g. {missing[:3]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def restore_target(abstract_tree) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat restore target: each leaf's shape, dtype and sharding (the sharding decides where it is read to)."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError("restore targets need a sharding on every leaf (jax.ShapeDtypeStruct(sharding=...))")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return {k: one(v) for k, v in flatten_state(abstract_tree).items()}


def with_shardings(abstract_tree, shardings) -> Any:
    """ShapeDtypeStructs of ``abstract_tree`` placed on ``shardings`` (a tree of the same structure)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_tree, shardings)


# ------------------------------------------------------------------------------------------------ data states
class ProcessJsonHandler(ocp.JsonCheckpointHandler):
    """Every process writes its own JSON mapping (``process_<i>.json``); restore reads all of them, in process order.

    orbax's ``JsonCheckpointHandler`` writes on the primary process only, which would keep one process's data state.
    """

    async def async_save(self, directory, item=None, args=None):
        item = args.item if args is not None else item
        text = json.dumps(dict(item or {}))
        path = directory / f"process_{jax.process_index()}.json"

        async def write():
            path.write_text(text)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="process_json_save")]

    def restore(self, directory, item=None, args=None) -> list[dict]:
        files = glob.glob(os.path.join(os.fspath(directory), "process_*.json"))
        index = {int(re.fullmatch(r"process_(\d+)\.json", os.path.basename(f)).group(1)): f for f in files}
        if sorted(index) != list(range(len(index))):
            raise CheckpointError(f"{directory}: per-process data states {sorted(index)} are not 0..n-1")
        states = []
        for i in range(len(index)):
            with open(index[i]) as fh:
                states.append(json.load(fh))
        return states


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """Complete checkpoint steps in ``directory`` (orbax's ``<step>`` directories), without starting orbax or JAX:
    entry points call this before the processes are joined."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


class Checkpointer:
    """Save/restore ``TrainState`` + this process's data-loader state under ``directory/<step>/``."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving (async); returns whether a save was started (``save_interval_steps`` unless ``force``).

        Every process calls it at the same step (a collective); ``data_state`` is this process's own JSON mapping.
        """
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(flatten_state(state)),
                                     DATA: ProcessJsonSave(data_state or {})})
        return self.manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, list[dict]]:
        """(state, data states) of ``step`` (default: the latest), the arrays read onto ``abstract_state``'s
        shardings; the data states are those of every process that saved, in process order."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}")
        path = self.step_path(step)
        target = restore_target(abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(target), DATA: ProcessJsonRestore()}))
        except Exception as e:  # orbax/tensorstore raise many types; all mean this step cannot be read
            raise CheckpointError(f"checkpoint {path} is truncated, corrupt or does not match the target state: "
                                  f"{type(e).__name__}: {str(e)[:500]}") from e
        flat = restored[STATE]
        unexpected = sorted(set(flat) - set(target))
        if unexpected:
            raise CheckpointError(f"checkpoint {path} holds arrays the target state lacks, e.g. {unexpected[:3]}")
        for name, t in target.items():
            got = flat[name]
            if tuple(got.shape) != tuple(t.shape):
                raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(got.shape)}, expected {t.shape}")
        return unflatten_state(flat, abstract_state), list(restored[DATA] or [])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------------------------------ params only
def save_params_leaf(directory: str | os.PathLike, name: str, array) -> None:
    """Write one parameter as its own orbax checkpoint ``directory/<name>`` (used by the streaming converter, so a
    456B model never needs more host memory than its largest parameter)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(os.fspath(directory)), name), {"value": array})


def load_params(directory: str | os.PathLike, abstract_params) -> Any:
    """Parameters written by ``save_params_leaf`` (one orbax checkpoint per leaf name of ``flatten_state``), read onto
    the shardings of ``abstract_params`` (ShapeDtypeStructs with shardings): each device reads only its shard."""
    directory = os.path.abspath(os.fspath(directory))
    flat = {}
    with ocp.StandardCheckpointer() as ckptr:
        for name, target in restore_target(abstract_params).items():
            path = os.path.join(directory, name)
            if not os.path.isdir(path):
                raise CheckpointError(f"parameter checkpoint {path} not found")
            try:
                flat[name] = ckptr.restore(path, {"value": target})["value"]
            except Exception as e:
                raise CheckpointError(f"parameter checkpoint {path} is truncated, corrupt or mis-shaped: "
                                      f"{type(e).__name__}: {str(e)[:500]}") from e
    return unflatten_state(flat, abstract_params)


def restore_params(directory: str | os.PathLike, step: int, abstract_params) -> Any:
    """Only the parameters of checkpoint ``step`` in ``directory`` (a ``Checkpointer`` directory whose state holds a
    ``params`` subtree: a training or RL state), read onto ``abstract_params``' shardings; the optimizer state is
    not read."""
    path = os.path.join(os.path.abspath(os.fspath(directory)), str(step), STATE)
    targets = {f"params.{k}": v for k, v in restore_target(abstract_params).items()}
    try:
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets), partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types; all mean this step cannot be read as these params
        raise CheckpointError(f"checkpoint {path} does not hold these parameters, or is damaged: "
                              f"{type(e).__name__}: {str(e)[:500]}") from e
    return unflatten_state({k[len("params."):]: v for k, v in restored.items()}, abstract_params)
