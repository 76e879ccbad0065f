"""Fault injection, one group per way a run fails:

* the user's input (flags, configs, work directory, data, mesh): one ``error:`` line naming it, exit 2, no traceback;
* numerics: a non-finite loss or gradient norm stops the run naming the step (exit 3) without saving that state, so
  rotation keeps the finite checkpoints; with ``run.on_nonfinite=skip`` the step leaves params and moments as they
  were; a non-finite state is never saved;
* checkpoint integrity: bytes flipped inside an orbax chunk (which orbax restores silently) fail verification, a
  damaged latest step makes a resume fall back to the previous intact one, no intact step is an error naming them;
  the same for converted weights (``load_params``) and for the per-process data states;
* signals: SIGINT or SIGTERM during an asynchronous save lets it finish, saves the current step and exits 0; a
  second Ctrl-C exits 130 without leaving a step that a resume would take; resumed metrics have no duplicates;
* data ranges: token ids checked against the vocabulary where they enter (token files, synthetic rows), positions
  against ``max_position_embeddings``.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax import checkpoint as C
from m1jax import data as D
from m1jax import train as T
from m1jax.checkpoint import NonFiniteError
from m1jax.config import ConfigError, ModelConfig
from m1jax.metrics import read_metrics
from m1jax.safetensors_io import CheckpointError
from m1jax.train import Trainer, resolve_configs
from sharding.mesh import make_mesh
from tests.train import launch

TINY_OVERRIDES = ["num_hidden_layers=2", "hidden_size=32", "intermediate_size=32", "vocab_size=32"]
CFG = ModelConfig.tiny(num_hidden_layers=2, hidden_size=32, intermediate_size=32, vocab_size=32)


def _train(workdir, *args, devices=1, module="experiments.train", env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", module, f"--workdir={workdir}", *launch.TINY, *args],
                          cwd=launch.ROOT, env=dict(launch.env(devices), **(env or {})), capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(proc, status):
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def _flip_byte(path, position):
    with open(path, "r+b") as fh:
        fh.seek(position)
        byte = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([byte ^ 0x10]))


def _chunk_files(directory):
    """orbax's array data files under ``directory`` (a step's ``state``, a parameter), largest first."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    return sorted(files, key=os.path.getsize, reverse=True)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=np.issubdtype(np.asarray(x).dtype, np.inexact))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ================================================================================================ user errors
@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    D.write_token_file(d / "empty", [], 32)
    D.write_token_file(d / "bad_id", [list(range(20)) * 3, [5, 6, 7, 31] * 10], 32)
    tokens = np.fromfile(d / "bad_id.tokens", dtype="<u2")
    tokens[3] = 40  # past the vocabulary its header (and the model) declare
    tokens.tofile(d / "bad_id.tokens")
    D.write_token_file(d / "signed", [list(range(20))], 32)
    header = json.loads((d / "signed.json").read_text())
    (d / "signed.json").write_text(json.dumps(dict(header, dtype="int16")))
    return d


@pytest.mark.parametrize("case,args,message", [
    ("file", [], "is a file, not a directory"),
    ("under_file", [], "cannot be written"),
    ("data", ["--data={data}/missing", "--seq_len=8"], "is neither synthetic:add, synthetic:mul nor a token file"),
    ("data", ["--data={data}/empty", "--seq_len=8"], "holds no tokens"),
    ("data", ["--data={data}/bad_id", "--seq_len=8", "--batch=2"],
     "bad_id: document 0 holds token id 40 at position 3, outside the vocabulary [0, 32)"),
    ("data", ["--data={data}/signed", "--seq_len=8"], "dtype 'int16'; token ids are stored as one of"),
    ("data", ["--seq_len=5000"], "seq_len 5000 exceeds the model's max_position_embeddings 4096"),
    ("config", ["--save_every=0"], "RunConfig.save_every: must be >= 1, got 0"),
    ("config", ["--keep=0"], "RunConfig.keep: must be >= 1 or None, got 0"),
    ("config", ["--set=run.on_nonfinite=ignore"], "RunConfig.on_nonfinite: must be one of"),
], ids=["workdir_is_file", "workdir_under_file", "data_missing", "data_empty", "id_past_vocab", "signed_ids",
        "seq_len_past_positions", "save_every_0", "keep_0", "on_nonfinite_choice"])
def test_user_errors_exit_2_with_one_line(tmp_path, token_files, case, args, message):
    workdir = tmp_path / "run"
    if case == "file":
        workdir.write_text("not a directory")
    elif case == "under_file":
        (tmp_path / "a_file").write_text("")
        workdir = tmp_path / "a_file" / "run"
    proc = _train(workdir, *[a.format(data=token_files) for a in args])
    assert message in _one_error_line(proc, 2)


# ================================================================================================ numerics
def _poisoned(batch):
    """The batch with one input id far past the embedding table: the forward pass reads NaN (a data-borne NaN)."""
    inputs = batch["inputs"]
    bad = jnp.asarray(inputs).at[0, 0].set(10**6)
    return dict(batch, inputs=jax.device_put(bad, inputs.sharding) if isinstance(inputs, jax.Array) else bad)


def test_skip_nonfinite_step_leaves_params_and_moments_unchanged():
    tc = T.TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    graphdef, state = T.create_train_state(CFG, tc, seed=0)
    host = jax.device_get(state)
    good = next(D.BatchLoader(D.make_source("synthetic:add", None, 0), 4))
    bad = _poisoned(good)
    plain = T.make_train_step(graphdef, tc)
    skip = T.make_train_step(graphdef, tc, skip_nonfinite=True)

    poisoned_state, metrics = plain(jax.device_put(host), bad)
    assert float(metrics["finite"]) == 0.0
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(poisoned_state.params))

    skipped, metrics = skip(jax.device_put(host), bad)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["grad_norm"]))
    assert int(skipped.step) == 1  # the step (schedule, data) moves on; the update does not
    assert _leaves_equal(skipped.params, host.params) and _leaves_equal(skipped.opt_state, host.opt_state)

    # a finite step is the same update with or without the guard, exactly
    want, want_metrics = plain(jax.device_put(host), good)
    got, got_metrics = skip(jax.device_put(host), good)
    assert float(got_metrics["finite"]) == 1.0
    assert _leaves_equal(got, want) and T.host_metrics(got_metrics) == T.host_metrics(want_metrics)


def test_skip_policy_in_the_trainer(tmp_path):
    """run.on_nonfinite=skip: the poisoned step 2 is recorded as skipped; its checkpoint holds step 1's params and
    moments; training goes on finite."""
    sections = resolve_configs(tmp_path, resume=False, overrides=[
        *TINY_OVERRIDES, "run.steps=3", "train.total_steps=3", "run.batch=8", "run.save_every=1", "run.keep=5",
        "run.on_nonfinite=skip"])
    lines = []
    trainer = Trainer(sections["model"], sections["train"], sections["run"], tmp_path, log=lines.append)
    step_fn = trainer.step_fn
    trainer.step_fn = lambda state, batch: step_fn(state, _poisoned(batch) if int(state.step) == 1 else batch)
    trainer.fit()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["skipped"] == 1.0 and records[1]["grad_norm"] == "nan"
    assert "skipped" not in records[2] and np.isfinite(records[2]["loss"])
    assert any("step 2: " in line and "update was skipped" in line for line in lines)
    target = C.with_shardings(trainer.abstract, trainer.state_shardings)
    checkpointer = C.Checkpointer(tmp_path / "checkpoints")
    one, _ = checkpointer.restore(target, 1)
    two, _ = checkpointer.restore(target, 2)
    assert (int(one.step), int(two.step)) == (1, 2)
    assert _leaves_equal(one.params, two.params) and _leaves_equal(one.opt_state, two.opt_state)


def test_divergence_stops_naming_the_step_and_keeps_the_finite_checkpoint(tmp_path):
    """A learning rate of 1e30 blows the weights up after step 1: the run stops at the first non-finite step with
    exit 3, and keep=1 rotation still holds a finite checkpoint (before: exit 0, only NaN checkpoints kept)."""
    proc = _train(tmp_path, "--steps=6", "--batch=2", "--lr=1e30", "--warmup=0", "--save_every=1", "--keep=1")
    line = _one_error_line(proc, 3)
    assert "step 2: " in line and "is not finite: stopped without saving it; the last checkpoint is step 1" in line
    assert C.saved_steps(tmp_path / "checkpoints") == [1]
    sections = resolve_configs(tmp_path, resume=True)
    _, abstract = T.abstract_train_state(sections["model"], sections["train"])
    mesh = make_mesh(None, jax.devices()[:1])
    state, _ = C.Checkpointer(tmp_path / "checkpoints").restore(
        C.with_shardings(abstract, T.train_state_shardings(abstract, mesh)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and read_metrics(tmp_path)[1]["grad_norm"] == "nan"


def test_a_nonfinite_state_is_never_saved(tmp_path):
    _, state = T.create_train_state(CFG, T.TrainConfig(), seed=0)
    embedding = state.params["embed_tokens"]["embedding"]
    embedding[...] = embedding[...].at[3, 4].set(jnp.inf)
    checkpointer = C.Checkpointer(tmp_path)
    with pytest.raises(NonFiniteError, match=r"step 7 holds NaN or inf in 1 arrays .*params.embed_tokens.embedding"):
        checkpointer.save(7, state, force=True)
    checkpointer.close()
    assert C.saved_steps(tmp_path) == []


def test_keep_must_be_at_least_one():
    with pytest.raises(ConfigError, match="RunConfig.keep: must be >= 1 or None, got 0"):
        T.RunConfig(keep=0)


# ================================================================================================ integrity
def _reference_digest(values: np.ndarray) -> list[int]:
    """The value digest written out element by element with Python integers (the module docstring's formula)."""
    mask = 2**32 - 1

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & mask
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & mask
        return h ^ (h >> 16)

    bits = values.astype(np.uint32) if values.dtype == np.bool_ else values.view(f"u{values.dtype.itemsize}")
    sums = [0, 0]
    for index in np.ndindex(values.shape):
        h = 0x9E3779B9
        for i in index:
            h = fmix(h ^ i)
        weights = (h | 1, fmix(h ^ 0x27D4EB2F) | 1)
        sums = [(s + int(bits[index]) * w) & mask for s, w in zip(sums, weights)]
    return sums


def test_value_digest_is_the_formula_on_any_sharding():
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((8, 6)).astype(np.float32),
              "bf16": rng.standard_normal((4, 2, 8)).astype(ml_dtypes.bfloat16),
              "i32": np.asarray(7, np.int32), "u32": rng.integers(0, 2**32, (2,), dtype=np.uint32),
              "bool": rng.random((8,)) > 0.5}
    want = {k: _reference_digest(v) for k, v in arrays.items()}
    assert C.digests(arrays)[0] == want  # host arrays
    assert C.digests({k: jnp.asarray(v) for k, v in arrays.items()})[0] == want  # one device
    mesh = make_mesh("data=4,tensor=2")
    sharded = {"f32": jax.device_put(arrays["f32"], NamedSharding(mesh, P("data", "tensor"))),
               "bf16": jax.device_put(arrays["bf16"], NamedSharding(mesh, P("tensor", None, "data")))}
    assert C.digests(sharded)[0] == {k: want[k] for k in sharded}
    changed = arrays["f32"].copy()
    changed[5, 2] = np.nextafter(changed[5, 2], np.float32(np.inf))  # one ulp of one element
    assert all(a != b for a, b in zip(C.digests({"f32": changed})[0]["f32"], want["f32"]))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Steps 1 and 2 of a tiny TrainState (different values) with data states."""
    directory = tmp_path_factory.mktemp("ckpt")
    _, state = T.create_train_state(CFG, T.TrainConfig(), seed=1)
    checkpointer = C.Checkpointer(directory, max_to_keep=None)
    checkpointer.save(1, state, {"rows": {"0": 1}}, force=True)
    state2 = jax.tree_util.tree_map(lambda x: x * 2 if x.dtype == np.float32 else x + 1, state)
    checkpointer.save(2, state2, {"rows": {"0": 2}}, force=True)
    checkpointer.close()
    _, abstract = T.abstract_train_state(CFG, T.TrainConfig())
    mesh = make_mesh(None, jax.devices()[:1])
    target = C.with_shardings(abstract, T.train_state_shardings(abstract, mesh))
    return directory, target, jax.device_get(state2)


def test_flipped_bytes_in_a_chunk_fail_verification(two_steps, tmp_path):
    directory, target, saved = two_steps
    work = tmp_path / "ckpt"
    data_file = _chunk_files(directory / "2" / "state")[0]
    for position in range(os.path.getsize(data_file) // 2, os.path.getsize(data_file), 997):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(directory, work)
        _flip_byte(str(data_file).replace(str(directory), str(work)), position)
        try:
            unverified, _ = C.Checkpointer(work).restore(target, 2, verify=False)
        except CheckpointError:
            continue  # this byte broke the chunk's framing: orbax notices; look for one it does not
        if not _leaves_equal(unverified, saved):
            break
    else:
        pytest.fail("no flipped byte changed the restored values silently")
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(work))}/2: \d+ of \d+ arrays differ "
                                              rf"from the digest"):
        C.Checkpointer(work).restore(target, 2)
    # resuming takes the previous intact step and names the damaged one
    step, _, data_states, damaged = C.Checkpointer(work).restore_latest_intact(target)
    assert step == 1 and data_states == [{"rows": {"0": 1}}] and len(damaged) == 1 and f"{work}/2" in str(damaged[0])


def test_damaged_data_state_and_missing_digest_are_refused(two_steps, tmp_path):
    directory, target, _ = two_steps
    work = tmp_path / "ckpt"
    shutil.copytree(directory, work)
    path = work / "2" / "data" / "process_0.json"
    path.write_text(path.read_text().replace('"0": 2', '"0": 3'))
    with pytest.raises(CheckpointError, match=rf"data state {re.escape(str(path))} is damaged"):
        C.Checkpointer(work).restore(target, 2)
    os.remove(work / "1" / "digest" / "metadata")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: data state .*/2/data/process_0.json is damaged.*/1 has no "
                                             r"digest"):
        C.Checkpointer(work).restore_latest_intact(target)


def test_load_params_detects_corruption(tmp_path):
    rng = np.random.default_rng(3)
    params = {"a": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal((16,)).astype(np.float32)}
    for name, value in params.items():
        C.save_params_leaf(tmp_path, name, value)
    single = NamedSharding(make_mesh(None, jax.devices()[:1]), P())
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=single) for k, v in params.items()}
    loaded = C.load_params(tmp_path, abstract)
    assert all(np.array_equal(np.asarray(loaded[k]), params[k]) for k in params)
    work = tmp_path / "damaged"
    size = os.path.getsize(_chunk_files(tmp_path / "a")[0])
    for position in range(size // 2, size, 997):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path, work, ignore=shutil.ignore_patterns("damaged"))
        _flip_byte(_chunk_files(work / "a")[0], position)
        try:
            unverified = C.load_params(work, abstract, verify=False)
        except CheckpointError:
            continue
        if not np.array_equal(np.asarray(unverified["a"]), params["a"]):
            break
    else:
        pytest.fail("no flipped byte changed the restored values silently")
    with pytest.raises(CheckpointError, match=r"1 of 2 arrays differ from the digest .*\['a'\]"):
        C.load_params(work, abstract)
    os.remove(tmp_path / "b" / C.PARAM_DIGEST_FILE)
    with pytest.raises(CheckpointError, match=rf"parameter checkpoint {tmp_path}/b has no digest"):
        C.load_params(tmp_path, abstract)


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path):
    overrides = [*TINY_OVERRIDES, "run.steps=4", "train.total_steps=6", "run.batch=8", "run.save_every=2",
                 "run.keep=5"]
    sections = resolve_configs(tmp_path, resume=False, overrides=overrides)
    Trainer(sections["model"], sections["train"], sections["run"], tmp_path, log=lambda _: None).fit()
    first = read_metrics(tmp_path)
    ckpts = tmp_path / "checkpoints"
    path = ckpts / "4" / "digest" / "metadata"  # damaged: a digest that no longer matches the arrays
    record = json.loads(path.read_text())
    record["arrays"][sorted(record["arrays"])[0]]["sums"][0] ^= 1
    path.write_text(json.dumps(record))

    sections = resolve_configs(tmp_path, resume=True, overrides=["run.steps=6"])
    lines = []
    Trainer(sections["model"], sections["train"], sections["run"], tmp_path, log=lines.append).fit(resume=True)
    warning = next(line for line in lines if line.startswith("warning: checkpoint"))
    assert f"{ckpts}/4: 1 of" in warning and f"resuming from the previous intact checkpoint {ckpts}/2" in warning
    assert os.path.isdir(ckpts / "damaged" / "4") and C.saved_steps(ckpts) == [2, 4, 6]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in records[:4]] == [(r["loss"], r["grad_norm"]) for r in first]

    for step in ("2", "4", "6"):
        shutil.rmtree(ckpts / step / "digest")
    with pytest.raises(CheckpointError, match=rf"no intact checkpoint in {ckpts}: checkpoint {ckpts}/6 has no "
                                              rf"digest.*{ckpts}/4.*{ckpts}/2"):
        Trainer(sections["model"], sections["train"], sections["run"], tmp_path, log=lambda _: None).fit(resume=True)


# ================================================================================================ signals
SIGNAL_ARGS = ["--batch=2", "--steps=8", "--save_every=3", "--log_every=1", "--warmup=0"]


def _slow_saves(workdir, *args, seconds):
    env = dict(launch.env(1), SLOW_SAVE_SECONDS=str(seconds))
    return subprocess.Popen([sys.executable, "-m", "tests.train.slow_saves", f"--workdir={workdir}", *launch.TINY,
                             *SIGNAL_ARGS, *args], cwd=launch.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _intact_steps(workdir):
    """Every listed step restores and verifies."""
    sections = resolve_configs(workdir, resume=True)
    _, abstract = T.abstract_train_state(sections["model"], sections["train"])
    target = C.with_shardings(abstract, T.train_state_shardings(abstract, make_mesh(None, jax.devices()[:1])))
    checkpointer = C.Checkpointer(workdir / "checkpoints")
    steps = checkpointer.all_steps()
    for step in steps:
        checkpointer.restore(target, step)
    return steps


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_an_async_save_finishes_it_and_saves_the_step(tmp_path, signum):
    cache = f"--compilation_cache={tmp_path.parent / 'xla_cache'}"
    proc = _slow_saves(tmp_path, cache, seconds=5)
    lines = launch.wait_for(proc, "SAVE IN FLIGHT")
    assert lines[-1].rstrip().endswith("checkpoints/3.orbax-checkpoint-tmp")
    if not any("] 4/8" in line for line in lines):  # the save thread's line can come after step 4's progress line
        lines += launch.wait_for(proc, "] 4/8")
    assert os.path.isdir(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp")
    proc.send_signal(signum)  # after step 4, while step 3 is still being written
    out = "".join(lines) + launch.finish([proc])[0]
    stopped = int(out.split("saving step ")[1].split()[0])
    assert 3 < stopped < 8
    assert _intact_steps(tmp_path) == [3, stopped]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, stopped + 1))
    if signum == signal.SIGINT:
        out = launch.finish([_slow_saves(tmp_path, cache, "--resume", seconds=0)])[0]
        assert f"resumed from {tmp_path}/checkpoints/{stopped}" in out
        assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))  # continued, none repeated


def test_second_ctrl_c_leaves_no_half_written_step(tmp_path):
    cache = f"--compilation_cache={tmp_path / 'xla_cache'}"
    proc = _slow_saves(tmp_path, cache, seconds=30)
    lines = launch.wait_for(proc, "SAVE IN FLIGHT")  # step 3, which will take 30 s
    proc.send_signal(signal.SIGINT)
    lines += launch.wait_for(proc, "stop requested")  # waiting for step 3 before saving the current step
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + out
    assert "error: interrupted (Ctrl-C)" in out and "Traceback" not in out
    assert os.path.isdir(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"), out  # abandoned mid-write
    assert C.saved_steps(tmp_path / "checkpoints") == []  # and not taken for a step

    out = launch.finish([_slow_saves(tmp_path, cache, "--resume", seconds=0)])[0]
    assert f"warning: removed {tmp_path}/checkpoints/3.orbax-checkpoint-tmp" in out
    assert "nothing to resume" in out
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


# ================================================================================================ data ranges
def test_token_ids_are_checked_where_they_enter(tmp_path, monkeypatch):
    D.write_token_file(tmp_path / "wide", [[1, 2, 3, 0, 4]], 70000)
    tokens = np.fromfile(tmp_path / "wide.tokens", dtype="<u4")
    tokens[3] = 2**31 + 5  # written by another tool; cast to int32 it would be negative
    tokens.tofile(tmp_path / "wide.tokens")
    with pytest.raises(D.DataError, match=r"wide: document 0 holds token id 2147483653 at position 3, outside the "
                                          r"vocabulary \[0, 70000\)"):
        next(D.BatchLoader(D.PackedTokenSource(tmp_path / "wide", 4), 1))

    D.write_token_file(tmp_path / "long", [list(range(10)), list(range(40))], 64)
    with pytest.raises(D.DataError, match="long: document 1 has 40 tokens, more than the model's "
                                          "max_position_embeddings 32"):
        loader = D.BatchLoader(D.PackedTokenSource(tmp_path / "long", 8, shuffle=False, max_position=32), 1)
        for _ in range(8):
            next(loader)
    with pytest.raises(D.DataError, match="seq_len 40 exceeds the model's max_position_embeddings 32"):
        D.make_source("synthetic:add", 40, max_position=32)

    import m1jax.data.synthetic as synthetic

    real = synthetic.teacher_sft_batch

    def bad_teacher(*args):
        tokens, mask = real(*args)
        tokens[0, 2] = -1
        return tokens, mask

    monkeypatch.setattr(synthetic, "teacher_sft_batch", bad_teacher)
    with pytest.raises(D.DataError, match=r"synthetic task '\+': row 0 of step 0 holds token id -1 at position 2"):
        next(D.BatchLoader(D.make_source("synthetic:add", None), 2))
