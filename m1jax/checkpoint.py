"""Orbax checkpoints of the training state: async saves, keep-N, resharding restore, atomicity, verified contents.

``Checkpointer(directory)`` wraps ``orbax.checkpoint.CheckpointManager`` (the stable v0 API). A step holds three items:

* ``state``: every array of a ``TrainState`` (step, params, optimizer state, rng), flattened to a
  ``{"params.embed_tokens.embedding.value": array}`` dict so the on-disk names do not depend on pytree node classes;
* ``data``: each process's data-loader state, one JSON file per process (``data/process_<i>.json``) holding the
  state and the SHA-256 of its text;
* ``digest``: ``digest/metadata`` (written by process 0): every array's shape, dtype and value digest (below).

``restore`` reads the arrays onto the shardings carried by the abstract state's ``ShapeDtypeStruct.sharding``, so a
checkpoint written on one mesh restores on any other mesh, device count or process count, and returns the data states
of every process that saved (a loader keyed by global row picks its rows from them).

Atomicity comes from orbax: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>`` only
when every process has finished writing, and temporary directories are never listed as steps. A kill or a second
Ctrl-C in the middle of a save therefore leaves a temporary directory, never a step; the next ``Checkpointer`` on the
directory deletes it (``interrupted_saves`` names what it found).

Verification: orbax and tensorstore read back bytes flipped inside a chunk without complaint. So ``save`` computes
every array's digest from the values being saved, and ``restore`` recomputes it from the values read and refuses a
step whose values differ (``CheckpointError`` naming the step and the arrays). ``restore_latest_intact`` walks back
from the newest step to the newest one that restores and verifies. A state holding NaN or inf is never saved
(``NonFiniteError``), so keep-N rotation never replaces finite checkpoints with diverged ones.

The value digest of an array ``x`` is two sums over its elements, ``sum_i bits(x_i) * w_k(i) mod 2**32`` (k = 1, 2):
``bits`` is the element's bit pattern as an unsigned integer, ``w_k(i)`` an odd hash of its global index (murmur3's
32-bit finaliser folded over the index's coordinates). Integer sums mod 2**32 do not depend on the order of addition,
so the digest is the same whatever the sharding, the number of processes or the reduction order: it is one jitted
reduction over the global arrays, whose replicated result every process reads (host arrays are summed in blocks
along the first axis). A change to one element always changes both sums (an odd weight is invertible mod 2**32); a
change to several goes unseen with a probability of about 2**-64.

Converted weights (``save_params_leaf`` / ``load_params``: one orbax checkpoint per parameter) carry the same digest
in ``<name>/m1jax_digest.json``, written after orbax finalised the parameter.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio

from m1jax.safetensors_io import CheckpointError
from sharding.multihost import any_process

STATE, DATA, DIGEST = "state", "data", "digest"
DIGEST_FILE = "metadata"          # the file orbax's JsonCheckpointHandler writes in an item directory
PARAM_DIGEST_FILE = "m1jax_digest.json"
DIGEST_FORMAT = "m1jax.digest/1"
DAMAGED = "damaged"               # <directory>/damaged/<step>: steps set aside after failing verification
TMP_MARK = ".orbax-checkpoint-tmp"


class NonFiniteError(FloatingPointError):
    """A state holds NaN or inf (a diverged run); it is not saved."""


# ------------------------------------------------------------------------------------------------ value digests
_SEED, _SALT, _MIX1, _MIX2 = 0x9E3779B9, 0x27D4EB2F, 0x85EBCA6B, 0xC2B2AE35
_HOST_BLOCK = 1 << 24  # elements per block of a host digest: bounds its temporary memory


def _fmix32(xp, h):
    """murmur3's 32-bit finaliser (uint32 arithmetic wraps mod 2**32)."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(_MIX1)
    h = h ^ (h >> 13)
    h = h * xp.uint32(_MIX2)
    return h ^ (h >> 16)


def _bits(xp, x):
    """Each element's bit pattern as uint32 (bool: 0/1; 8- and 16-bit types zero-extended)."""
    if x.dtype == np.bool_:
        return x.astype(xp.uint32)
    unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}.get(np.dtype(x.dtype).itemsize)
    if unsigned is None:
        raise ValueError(f"no value digest for {x.dtype}: elements of 1, 2 or 4 bytes only")
    bits = x.view(unsigned) if xp is np else jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(xp.uint32)


def _weighted_sums(xp, bits, first_row: int = 0):
    """The two digest sums of ``bits`` (uint32 [d0, ...]), whose row 0 is row ``first_row`` of the whole array."""
    h = xp.asarray(_SEED, xp.uint32)
    for axis, n in enumerate(bits.shape):
        index = xp.arange(n, dtype=xp.uint32) + xp.uint32(first_row if axis == 0 else 0)
        h = _fmix32(xp, h ^ index.reshape([n if a == axis else 1 for a in range(bits.ndim)]))
    w1 = h | xp.uint32(1)
    w2 = _fmix32(xp, h ^ xp.uint32(_SALT)) | xp.uint32(1)
    return xp.sum(bits * w1, dtype=xp.uint32), xp.sum(bits * w2, dtype=xp.uint32)


def _host_digest(x: np.ndarray) -> tuple[list[int], bool]:
    x = np.asarray(x)
    finite = bool(np.isfinite(x).all()) if np.issubdtype(x.dtype, np.inexact) or x.dtype.kind == "V" else True
    with np.errstate(over="ignore"):
        if x.ndim == 0:
            return [int(s) for s in _weighted_sums(np, _bits(np, x))], finite
        rows = max(1, _HOST_BLOCK // max(1, math.prod(x.shape[1:])))
        total = [0, 0]
        for start in range(0, x.shape[0], rows):
            sums = _weighted_sums(np, _bits(np, x[start:start + rows]), start)
            total = [(t + int(s)) % 2**32 for t, s in zip(total, sums)]
    return total, finite


@jax.jit
def _device_digests(flat: dict[str, jax.Array]) -> dict[str, tuple[jax.Array, jax.Array]]:
    out = {}
    for name, x in flat.items():
        finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
        out[name] = (jnp.stack(_weighted_sums(jnp, _bits(jnp, x))), finite)
    return out


def _local(x: jax.Array) -> np.ndarray:
    """A replicated result as numpy, on any process (a multi-process array is not fully addressable)."""
    return np.asarray(x.addressable_data(0))


def digests(flat: Mapping[str, Any]) -> tuple[dict[str, list[int]], dict[str, bool]]:
    """({name: [sum1, sum2]}, {name: all values finite}) of named arrays (see the module docstring).

    ``jax.Array``s are digested where they live, in one jitted reduction (a collective when they span processes:
    every process must call this with the same names); anything else on the host.
    """
    sums, finite = {}, {}
    on_device = {k: v for k, v in flat.items() if isinstance(v, jax.Array)}
    if on_device:
        for name, (s, ok) in _device_digests(on_device).items():
            sums[name], finite[name] = [int(v) for v in _local(s)], bool(_local(ok))
    for name, value in flat.items():
        if name not in on_device:
            sums[name], finite[name] = _host_digest(value)
    return sums, finite


def _digest_record(flat: Mapping[str, Any], sums: Mapping[str, list[int]]) -> dict:
    return {"format": DIGEST_FORMAT, "arrays": {
        name: {"shape": list(np.shape(x)), "dtype": np.dtype(x.dtype).name, "sums": sums[name]}
        for name, x in flat.items()}}


def _read_digest(path: str, where: str) -> dict[str, dict]:
    """The ``arrays`` of the digest record at ``path`` (``where`` names the checkpoint in errors)."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{where} has no digest ({path} is missing): it is damaged or was written before "
                              f"digests existed (restore it with verify=False only if you trust it)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: its digest {path} is unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("format") != DIGEST_FORMAT or "arrays" not in record:
        raise CheckpointError(f"{where}: its digest {path} is not an {DIGEST_FORMAT} record")
    return record["arrays"]


def _verify(where: str, flat: Mapping[str, jax.Array], saved: Mapping[str, dict]) -> None:
    """Raise CheckpointError unless every array of ``flat`` has the digest ``saved`` records for it."""
    sums, _ = digests(flat)
    bad = sorted(name for name in flat if sums[name] != saved[name]["sums"])
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} of {len(flat)} arrays differ from the digest written when it "
                              f"was saved (e.g. {bad[:3]}): its files are damaged")


def _run_sync_via_new_loop(coro):
    """orbax's ``asyncio_utils._run_sync_via_new_loop`` (every synchronous orbax save and restore runs its coroutine on
    a fresh event loop), except that when the coroutine fails, the loop's left-over tasks are cancelled and awaited
    before it closes. orbax 0.12.8 closes the loop at once: when one read of a damaged checkpoint fails, the reads
    gathered with it are still waiting on tensorstore futures, and tensorstore's threads later schedule their
    completion on the closed loop ("Exception ignored in: None ... RuntimeError: Event loop is closed", printed after
    the CheckpointError was raised, in whatever runs then)."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    except Exception:
        _cancel_left_over_tasks(loop)
        raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _cancel_left_over_tasks(loop) -> None:
    """Cancels ``loop``'s unfinished tasks and runs the loop until they have ended; their tensorstore futures then
    complete on an open loop, or not at all. Only on failure: orbax avoids ``asyncio.run`` because listing the tasks
    reads asyncio's process-wide task set, which its concurrent save threads change under it, so the successful path
    (nothing left over) stays orbax's own."""
    try:
        left = asyncio.all_tasks(loop)
    except RuntimeError:  # that set kept changing while it was read: close as orbax does
        return
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))


if hasattr(_orbax_asyncio, "_run_sync_via_new_loop"):  # the orbax versions setup.cfg allows
    _orbax_asyncio._run_sync_via_new_loop = _run_sync_via_new_loop


@contextlib.contextmanager
def _quiet_asyncio():
    """orbax's failed reads also log 'Task exception was never retrieved' tracebacks; the CheckpointError says it."""
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------------ flat names
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


def _as_saved(target: Mapping[str, jax.ShapeDtypeStruct], saved: Mapping[str, dict] | None,
              where: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The restore target in the dtypes the arrays were saved in (the digest is of those bits; the caller's dtype
    is applied after verification)."""
    if saved is None:
        return dict(target)
    missing = [n for n in target if n not in saved]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} arrays of the target state, e.g. {missing[:3]}")
    return {n: jax.ShapeDtypeStruct(t.shape, jnp.dtype(saved[n]["dtype"]), sharding=t.sharding)
            for n, t in target.items()}


def _check_shapes(where: str, flat: Mapping[str, Any], target: Mapping[str, jax.ShapeDtypeStruct]) -> None:
    unexpected = sorted(set(flat) - set(target))
    if unexpected:
        raise CheckpointError(f"{where} holds arrays the target state lacks, e.g. {unexpected[:3]}")
    for name, t in target.items():
        if tuple(flat[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(flat[name].shape)}, expected {t.shape}")


def _agree(failure: CheckpointError | None, where: str) -> None:
    """Raise on every process when reading failed on any (before the collective digest, which all must enter)."""
    if any_process(failure is not None):
        raise failure or CheckpointError(f"{where} could not be read on another process")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------ data states
def encode_data_state(item: Mapping[str, Any]) -> str:
    """A data state as ``data/process_<i>.json`` text: the state and the SHA-256 of its canonical JSON."""
    canonical = json.dumps(dict(item), sort_keys=True)
    return json.dumps({"sha256": hashlib.sha256(canonical.encode()).hexdigest(), "state": json.loads(canonical)})


def decode_data_state(text: str, path: str) -> dict:
    """Inverse of ``encode_data_state``; CheckpointError naming ``path`` when the text is damaged."""
    try:
        record = json.loads(text)
        state, sha = record["state"], record["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"data state {path} is damaged (not an m1jax data-state record)") from None
    if hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest() != sha:
        raise CheckpointError(f"data state {path} is damaged (its SHA-256 does not match its contents)")
    return state


class ProcessJsonHandler(ocp.JsonCheckpointHandler):
    """Every process writes its own JSON mapping (``process_<i>.json``); restore reads all of them, in process order.

    orbax's ``JsonCheckpointHandler`` writes on the primary process only, which would keep one process's data state.
    """

    async def async_save(self, directory, item=None, args=None):
        item = args.item if args is not None else item
        text = encode_data_state(item or {})
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
                states.append(decode_data_state(fh.read(), index[i]))
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


# ------------------------------------------------------------------------------------------------ train states
class Checkpointer:
    """Save/restore ``TrainState`` + this process's data-loader state under ``directory/<step>/``.

    ``interrupted_saves``: the temporary directories of saves that never finished (a crash, a kill, a second Ctrl-C)
    found on opening; orbax deletes them.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.interrupted_saves = sorted(glob.glob(os.path.join(self.directory, f"*{TMP_MARK}*")))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, DIGEST))

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving (async); returns whether a save was started (``save_interval_steps`` unless ``force``).

        Every process calls it at the same step (a collective); ``data_state`` is this process's own JSON mapping.
        Raises NonFiniteError, saving nothing, when an array holds NaN or inf.
        """
        if not (force or self.manager.should_save(int(step))):
            return False
        self.wait()  # orbax would wait for the previous save too, but in a join that logs an interrupt as a failure
        flat = flatten_state(state)
        sums, finite = digests(flat)
        bad = sorted(name for name, ok in finite.items() if not ok)
        if bad:
            raise NonFiniteError(f"the state of step {step} holds NaN or inf in {len(bad)} arrays (e.g. {bad[:3]}): "
                                 f"not saved")
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(flat), DATA: ProcessJsonSave(data_state or {}),
                                     DIGEST: ocp.args.JsonSave(_digest_record(flat, sums))})
        return self.manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, abstract_state, step: int | None = None, *, verify: bool = True) -> tuple[Any, list[dict]]:
        """(state, data states) of ``step`` (default: the latest), the arrays read onto ``abstract_state``'s
        shardings and dtypes; the data states are those of every process that saved, in process order.

        ``verify``: check every array against the digest written at save time. CheckpointError (naming the step)
        when the step is missing, unreadable, does not match the target or fails verification.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}")
        path = self.step_path(step)
        where = f"checkpoint {path}"
        wanted = restore_target(abstract_state)
        flat, data_states, saved, failure = {}, [], None, None
        try:
            saved = _read_digest(os.path.join(path, DIGEST, DIGEST_FILE), where) if verify else None
            target = _as_saved(wanted, saved, where)
            try:
                with _quiet_asyncio():
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        **{STATE: ocp.args.StandardRestore(target), DATA: ProcessJsonRestore()}))
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types; all mean this step cannot be read
                raise CheckpointError(f"{where} is truncated, corrupt or does not match the target state: "
                                      f"{type(e).__name__}: {str(e)[:500]}") from e
            flat, data_states = restored[STATE], list(restored[DATA] or [])
            _check_shapes(where, flat, target)
        except CheckpointError as e:
            failure = e
        _agree(failure, where)
        if saved is not None:
            _verify(where, flat, saved)
        flat = {n: x if x.dtype == wanted[n].dtype else x.astype(wanted[n].dtype) for n, x in flat.items()}
        return unflatten_state(flat, abstract_state), data_states

    def restore_latest_intact(self, abstract_state) -> tuple[int, Any, list[dict], list[CheckpointError]]:
        """(step, state, data states, errors of the newer steps that failed) of the newest step that restores and
        verifies; CheckpointError listing every step's failure when none does."""
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state, data_states = self.restore(abstract_state, step)
            except CheckpointError as e:
                damaged.append(e)
                continue
            return step, state, data_states, damaged
        raise CheckpointError(f"no intact checkpoint in {self.directory}: "
                              + ("; ".join(str(e) for e in damaged) if damaged else "it holds none"))

    def set_aside(self, steps) -> list[str]:
        """Move ``steps`` (damaged ones) to ``<directory>/damaged/`` (process 0; every process calls this), so they
        are no longer listed and the run can save those steps again; returns where they went."""
        moved = []
        for step in steps:
            dest = os.path.join(self.directory, DAMAGED, str(step))
            n = 1
            while os.path.exists(dest):
                dest, n = os.path.join(self.directory, DAMAGED, f"{step}.{n}"), n + 1
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(self.step_path(step), dest)
            moved.append(dest)
        _barrier("m1jax checkpoint set aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        """Until the save in flight is finalised. Polls first: a KeyboardInterrupt (a second Ctrl-C) then leaves from
        here, not from inside orbax's join, which would log it as a failed save with a traceback."""
        while self.manager.is_saving_in_progress():
            time.sleep(0.02)
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


# ------------------------------------------------------------------------------------------------ params only
def save_params_leaf(directory: str | os.PathLike, name: str, array) -> None:
    """Write one parameter as its own orbax checkpoint ``directory/<name>`` with its digest (used by the streaming
    converter, so a 456B model never needs more host memory than its largest parameter)."""
    path = os.path.join(os.path.abspath(os.fspath(directory)), name)
    sums, _ = digests({name: array})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"value": array})
    if jax.process_index() == 0:  # after orbax finalised the parameter: a digest marks it complete
        tmp = os.path.join(path, PARAM_DIGEST_FILE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(_digest_record({"value": array}, {"value": sums[name]}), fh)
        os.replace(tmp, os.path.join(path, PARAM_DIGEST_FILE))


def load_params(directory: str | os.PathLike, abstract_params, *, verify: bool = True) -> Any:
    """Parameters written by ``save_params_leaf`` (one orbax checkpoint per leaf name of ``flatten_state``), read onto
    the shardings of ``abstract_params`` (ShapeDtypeStructs with shardings): each device reads only its shard.

    ``verify``: check every parameter against its digest; CheckpointError naming the damaged parameter files.
    """
    directory = os.path.abspath(os.fspath(directory))
    wanted = restore_target(abstract_params)
    flat, saved, failure = {}, {}, None
    try:
        with ocp.StandardCheckpointer() as ckptr, _quiet_asyncio():
            for name, t in wanted.items():
                path = os.path.join(directory, name)
                where = f"parameter checkpoint {path}"
                if not os.path.isdir(path):
                    raise CheckpointError(f"{where} not found")
                record = _read_digest(os.path.join(path, PARAM_DIGEST_FILE), where) if verify else None
                target = _as_saved({"value": t}, record, where)
                if record is not None:
                    saved[name] = record["value"]
                try:
                    flat[name] = ckptr.restore(path, target)["value"]
                except Exception as e:
                    raise CheckpointError(f"{where} is truncated, corrupt or mis-shaped: "
                                          f"{type(e).__name__}: {str(e)[:500]}") from e
    except CheckpointError as e:
        failure = e
    _agree(failure, f"parameter checkpoint {directory}")
    if verify:
        _verify(f"parameter checkpoint {directory}", flat, saved)
    flat = {n: x if x.dtype == wanted[n].dtype else x.astype(wanted[n].dtype) for n, x in flat.items()}
    return unflatten_state(flat, abstract_params)


def restore_params(directory: str | os.PathLike, step: int, abstract_params, *, verify: bool = True) -> Any:
    """Only the parameters of checkpoint ``step`` in ``directory`` (a ``Checkpointer`` directory whose state holds a
    ``params`` subtree: a training or RL state), read onto ``abstract_params``' shardings and dtypes and checked
    against the step's digest; the optimizer state is not read."""
    step_path = os.path.join(os.path.abspath(os.fspath(directory)), str(step))
    where = f"checkpoint {step_path}"
    wanted = {f"params.{k}": v for k, v in restore_target(abstract_params).items()}
    saved = _read_digest(os.path.join(step_path, DIGEST, DIGEST_FILE), where) if verify else None
    target = _as_saved(wanted, saved, where)
    try:
        with _quiet_asyncio():
            flat = ocp.PyTreeCheckpointer().restore(os.path.join(step_path, STATE), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types; all mean this step cannot be read as these params
        raise CheckpointError(f"{where} does not hold these parameters, or is damaged: "
                              f"{type(e).__name__}: {str(e)[:500]}") from e
    if saved is not None:
        _verify(where, flat, saved)
    flat = {n[len("params."):]: x if x.dtype == wanted[n].dtype else x.astype(wanted[n].dtype)
            for n, x in flat.items()}
    return unflatten_state(flat, abstract_params)
