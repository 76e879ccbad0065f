"""Orbax checkpoints: resharding restore across meshes (8 fake CPU devices), per-process data states, atomicity,
damaged files; the preemption guard."""
import asyncio
import concurrent.futures
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from orbax.checkpoint._src import asyncio_utils

from m1jax import checkpoint as C
from m1jax import train as T
from m1jax.train.preemption import PreemptionGuard
from m1jax.config import ModelConfig, m1_layer_types
from m1jax.safetensors_io import CheckpointError
from sharding.mesh import make_mesh

CFG = ModelConfig.tiny(num_hidden_layers=2, layer_types=m1_layer_types(2, 2), vocab_size=64, hidden_size=32,
                       intermediate_size=16, num_local_experts=4)
TC = T.TrainConfig()


def _shifted(state, step):
    """``state`` with every float leaf moved by a step-dependent amount (moments != 0, and each step's arrays differ
    from every other step's, so a restore of the wrong step cannot pass for the right one)."""
    return jax.tree_util.tree_map(lambda x: x + 0.5 + 0.125 * step if x.dtype == np.float32 else x, state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """TrainStates saved at steps 1-3 (each with its own values) from a data=2,expert=2,tensor=2 mesh with FSDP, and
    a step 9 saved alone in another directory (a later save, to stand in for one that was interrupted).

    Returns (directory, step 3's leaves on the host, step 3's state, the step-9 directory)."""
    mesh = make_mesh("data=2,expert=2,tensor=2")
    _, state = T.create_train_state(CFG, TC, seed=3, mesh=mesh, fsdp=True)
    directory = tmp_path_factory.mktemp("ckpt")
    ck = C.Checkpointer(directory, max_to_keep=2)
    for step in (1, 2, 3):
        ck.save(step, _shifted(state, step), {"epoch": 0, "doc": step, "offset": 5, "seed": 1})
    ck.close()
    later = tmp_path_factory.mktemp("later")
    ck = C.Checkpointer(later)
    ck.save(9, _shifted(state, 9), {"epoch": 0, "doc": 9, "offset": 5, "seed": 1})
    ck.close()
    state = _shifted(state, 3)
    host = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
    return directory, host, state, later


def _target(mesh_spec, fsdp=False, devices=None):
    _, abstract = T.abstract_train_state(CFG, TC)
    mesh = make_mesh(mesh_spec, devices)
    return C.with_shardings(abstract, T.train_state_shardings(abstract, mesh, fsdp)), mesh


@pytest.mark.parametrize("mesh_spec,n_devices", [("expert=4,data=2", 8), ("tensor=2,data=2", 4), (None, 1)])
def test_restore_on_another_mesh(saved, mesh_spec, n_devices):
    directory, host, original, _ = saved
    target, mesh = _target(mesh_spec, devices=jax.devices()[:n_devices])
    ck = C.Checkpointer(directory)
    assert ck.all_steps() == [2, 3]  # keep-2
    state, data_states = ck.restore(target)
    assert data_states == [{"epoch": 0, "doc": 3, "offset": 5, "seed": 1}]  # one saving process
    for got, want, tgt in zip(jax.tree_util.tree_leaves(state), host, jax.tree_util.tree_leaves(target)):
        np.testing.assert_array_equal(np.asarray(got), want)  # exact
        assert got.sharding == tgt.sharding
    assert {d for x in jax.tree_util.tree_leaves(state) for d in x.sharding.device_set} == set(mesh.devices.flat)
    # something really is laid out differently from the saving mesh
    assert any(a.sharding.spec != b.sharding.spec for a, b in zip(jax.tree_util.tree_leaves(state),
                                                                    jax.tree_util.tree_leaves(original)))


def test_interrupted_save_is_never_restored(saved, tmp_path):
    """orbax writes <step>.orbax-checkpoint-tmp-* and renames it when complete: a leftover temporary directory
    (a save killed midway) is not a step, and the latest complete step is restored."""
    directory, host, _, later = saved
    work = tmp_path / "c"
    shutil.copytree(directory, work)
    # step 9's complete files under orbax's temporary name, without the commit marker: a save killed before its rename
    shutil.copytree(later / "9", work / "9.orbax-checkpoint-tmp-1234")
    os.remove(work / "9.orbax-checkpoint-tmp-1234" / "commit_success.txt")
    ck = C.Checkpointer(work)
    assert ck.latest_step() == 3
    assert ck.interrupted_saves == [str(work / "9.orbax-checkpoint-tmp-1234")]  # named, then removed by orbax
    target, _ = _target("data=8")
    state, data_states = ck.restore(target)
    assert data_states == [{"epoch": 0, "doc": 3, "offset": 5, "seed": 1}]
    for got, want in zip(jax.tree_util.tree_leaves(state), host):  # step 3's values, not step 9's
        np.testing.assert_array_equal(np.asarray(got), want)


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    directory, _, _, _ = saved
    work = tmp_path / "c"
    shutil.copytree(directory, work)
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(work / "3" / "state") for f in fs
                  if os.path.getsize(os.path.join(r, f)) > 1000]
    assert data_files
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    target, _ = _target("data=8")
    with pytest.raises(CheckpointError, match=str(work / "3")):
        C.Checkpointer(work).restore(target)
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        C.Checkpointer(work).restore(target, step=7)


def test_data_states_of_several_processes_come_back_in_process_order(tmp_path):
    """Each process writes its own data state (process_<i>.json); restore returns them all, in process order."""
    directory = tmp_path / "ck" / "4" / "data"
    directory.mkdir(parents=True)
    for i, rows in ((1, {"2": {"next_index": 4}}), (0, {"0": {"next_index": 4}})):
        (directory / f"process_{i}.json").write_text(C.encode_data_state({"rows": rows}))
    assert C.ProcessJsonHandler().restore(directory) == [{"rows": {"0": {"next_index": 4}}},
                                                          {"rows": {"2": {"next_index": 4}}}]
    (directory / "process_3.json").write_text(C.encode_data_state({}))
    with pytest.raises(CheckpointError, match=r"\[0, 1, 3\] are not 0..n-1"):
        C.ProcessJsonHandler().restore(directory)
    assert C.saved_steps(tmp_path / "ck") == [4] and C.saved_steps(tmp_path / "none") == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard_turns_signals_into_a_flag(signum):
    with PreemptionGuard() as guard:
        assert not guard.agreed()
        os.kill(os.getpid(), signum)
        assert guard.requested and guard.signal == signum
        assert guard.agreed()  # one process: its own flag decides
        if signum == signal.SIGINT:  # a second Ctrl-C does not wait for the save
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler



class _ExternalRead:
    """A read that another thread completes, as tensorstore's: its completion is scheduled on the awaiting loop
    (``call_soon_threadsafe``) unless the awaiting future was cancelled first."""

    def __init__(self):
        self.cancelled, self.complete = False, None

    async def wait(self):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(lambda f: setattr(self, "cancelled", f.cancelled()))
        self.complete = lambda: None if self.cancelled else loop.call_soon_threadsafe(future.set_result, None)
        await future


def _run_failed_restore(run_sync):
    """Runs, with orbax's loop runner ``run_sync``, a restore whose second read fails while the first still waits on
    its thread; then that thread completes the first read. Returns what the completion raised (None: nothing)."""
    pending = _ExternalRead()

    async def damaged():
        await asyncio.sleep(0)
        raise OSError("DATA_LOSS: damaged chunk")

    async def restore():
        await asyncio.gather(pending.wait(), damaged())

    with pytest.raises(OSError, match="DATA_LOSS"):
        run_sync(restore())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(pending.complete).exception()


def test_orbax_event_loop_is_drained_before_it_closes():
    """A failed orbax read left its sibling reads waiting on tensorstore futures, and orbax 0.12.8 closed its loop at
    once: tensorstore's threads then scheduled the completions on a closed loop ("RuntimeError: Event loop is
    closed", printed in whatever ran next). m1jax's loop runner, installed into orbax, cancels and awaits the left-over
    tasks before closing the loop."""
    assert asyncio_utils._run_sync_via_new_loop is C._run_sync_via_new_loop
    assert _run_failed_restore(C._run_sync_via_new_loop) is None
