"""Chaos: a small training run is killed with SIGKILL at random moments, several times, and resumed each time; it ends
with the same parameters, optimizer state, data position and metrics history as the run that was never interrupted.

The kill moments come from a seeded RNG: which kind of moment (while a checkpoint is being written, a random delay
after a step, a random delay after the start: imports, compilation, restore) and which step. Saves are frequent and
slowed down by the drill in ``tests.train.slow_saves``, which also announces them, so a "save" kill lands while that
save is certainly incomplete (the test checks that its temporary directory is there and no step was listed).

Equality is exact (not a tolerance): every process runs the same compiled programs (the persistent compilation cache
is shared) on the same CPU, a resume restores the saved bits (verified against their digests), and the data streams
continue from the saved per-row positions, so no float is computed differently.
"""
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np

from m1jax import checkpoint as C
from m1jax import train as T
from m1jax.metrics import read_metrics
from m1jax.train import resolve_configs
from sharding.mesh import make_mesh
from tests.train import launch

STEPS = 14
ARGS = [*launch.TINY, "--batch=2", f"--steps={STEPS}", "--save_every=2", "--keep=2", "--warmup=2", "--lr=3e-3"]
KILLS = 4
SEED = 20240611
SAVE_SECONDS = 0.4
COMPARED = ("step", "loss", "aux_loss", "grad_norm", "learning_rate", "tokens")


def _start(workdir, cache, *extra, seconds=SAVE_SECONDS):
    env = dict(launch.env(1), SLOW_SAVE_SECONDS=str(seconds))
    return subprocess.Popen([sys.executable, "-m", "tests.train.slow_saves", f"--workdir={workdir}",
                             f"--compilation_cache={cache}", *ARGS, *extra], cwd=launch.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, predicate, what, timeout=240):
    """The first output line for which ``predicate`` holds (the process is killed and the test fails otherwise)."""
    deadline, seen = time.time() + timeout, []
    for line in proc.stdout:
        seen.append(line)
        if predicate(line):
            return line
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"no {what} in output:\n{''.join(seen[-30:])}")


def _save_at_or_after(step):
    def predicate(line):
        # The step directory's name starts with its step; a progress line may be glued to it (it is written from
        # the training thread while the save's thread prints), so take the digits only.
        match = re.match(r"SAVE IN FLIGHT \S*/checkpoints/(\d+)", line)
        return match is not None and int(match.group(1)) >= step
    return predicate


def _final(workdir):
    """(state, data states) of the run's last checkpoint, restored onto one device."""
    sections = resolve_configs(workdir, resume=True)
    _, abstract = T.abstract_train_state(sections["model"], sections["train"])
    target = C.with_shardings(abstract, T.train_state_shardings(abstract, make_mesh(None, jax.devices()[:1])))
    checkpointer = C.Checkpointer(workdir / "checkpoints")
    assert checkpointer.latest_step() == STEPS
    return checkpointer.restore(target)


def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    cache = tmp_path / "xla_cache"
    launch.finish([_start(tmp_path / "straight", cache, seconds=0)])
    rng = np.random.default_rng(SEED)
    kinds = [str(k) for k in rng.choice(["save", "step", "start"], size=KILLS)]
    if "save" not in kinds:
        kinds[int(rng.integers(KILLS))] = "save"
    work, killed_mid_save, log = tmp_path / "chaos", 0, []
    for i, kind in enumerate(kinds):
        resume_from = max(C.saved_steps(work / "checkpoints"), default=0)
        target = int(rng.integers(min(resume_from + 1, STEPS - 3), STEPS - 2))  # a step this run has to take
        proc = _start(work, cache, *(["--resume"] if i else []))
        try:
            if kind == "save":
                line = _wait(proc, _save_at_or_after(target), f"save at step >= {target}")
                proc.kill()
                proc.wait(timeout=30)
                tmp = line.split()[-1]
                step = int(os.path.basename(tmp).split(".")[0])
                assert os.path.isdir(tmp) and step not in C.saved_steps(work / "checkpoints"), (tmp, log)
                killed_mid_save += 1
            elif kind == "step":
                _wait(proc, lambda line: f"] {target}/{STEPS} " in line, f"step {target}")
                time.sleep(rng.uniform(0, 0.1))
            else:
                time.sleep(rng.uniform(0, 8))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        log.append((kind, target, resume_from, C.saved_steps(work / "checkpoints")))
    out = launch.finish([_start(work, cache, "--resume", seconds=0)])[0]
    assert killed_mid_save >= 1, log
    assert "resumed from" in out, (out[-3000:], log)

    want, got = read_metrics(tmp_path / "straight"), read_metrics(work)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), log  # each step once, in order
    assert [[r[k] for k in COMPARED] for r in got] == [[r[k] for k in COMPARED] for r in want], log
    assert len({r["run"] for r in got}) == 1  # one run name across the resumes
    (want_state, want_data), (got_state, got_data) = _final(tmp_path / "straight"), _final(work)
    assert got_data == want_data
    for a, b in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
