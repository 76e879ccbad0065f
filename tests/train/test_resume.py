"""experiments.train end to end in subprocesses: 20 steps straight == 12 steps + SIGKILL + resume to 16 + SIGTERM
(save on signal, clean exit) + resume to 20, loss for loss in exact fp32, with every step recorded once; user errors
(bad keys and types, a flag and --set naming one field, a refused resume, a bad mesh) exit 2 with one line."""
import os
import signal
import subprocess
import sys

import pytest

from m1jax.config import ModelConfig
from m1jax.config.files import write_config
from m1jax.metrics import read_metrics
from m1jax.train import RunConfig, TrainConfig
from tests.train import launch

ARGS = [*launch.TINY, "--batch=4", "--steps=20", "--save_every=5", "--lr=3e-3", "--warmup=3", "--data=synthetic:add"]


def _start(workdir, cache, *extra):
    return launch.start(workdir, f"--compilation_cache={cache}", *ARGS, *extra, devices=1)


def test_kill_resume_matches_straight_run(tmp_path):
    cache = tmp_path / "xla_cache"
    launch.finish([_start(tmp_path / "a", cache)])
    reference = launch.losses(tmp_path / "a")
    assert [s for s, _, _ in reference] == list(range(1, 21))

    work = tmp_path / "b"
    proc = _start(work, cache, "--pause_at_step=12")
    launch.wait_for(proc, "PAUSED at step 12")
    proc.send_signal(signal.SIGKILL)  # hard kill: only the step-10 checkpoint survives
    proc.wait(timeout=30)
    assert sorted(os.listdir(work / "checkpoints")) == ["10", "5"]
    assert [s for s, _, _ in launch.losses(work)] == list(range(1, 13))

    proc = _start(work, cache, "--resume", "--pause_at_step=16")
    lines = launch.wait_for(proc, "PAUSED at step 16")
    assert any("resumed from" in line and line.rstrip().endswith("/10") for line in lines)
    proc.send_signal(signal.SIGTERM)  # preemption: save step 16, exit 0
    out = launch.finish([proc])[0]
    assert "saving step 16" in out
    assert "16" in os.listdir(work / "checkpoints")

    launch.finish([_start(work, cache, "--resume")])
    # Each resume dropped the records past its checkpoint (11-12 after the kill), so every step is there once and
    # equals the straight run's exactly.
    assert launch.losses(work) == reference
    assert len({r["run"] for r in read_metrics(work)}) == 1  # one run name across the resumes


def _refusable_run(workdir):
    """A work directory that looks like a run with a checkpoint, stored with learning_rate 3e-3."""
    os.makedirs(workdir / "checkpoints" / "5")
    model = ModelConfig.tiny(num_hidden_layers=2, hidden_size=32, intermediate_size=32, vocab_size=32)
    write_config(workdir, model=model, train=TrainConfig(learning_rate=3e-3, total_steps=20),
                 run=RunConfig(batch=4, steps=20))


@pytest.mark.parametrize("args,message", [
    (["--set=hiden_size=64"], "unknown config key 'hiden_size'"),
    (["--set=hidden_size=big"], "ModelConfig.hidden_size: expected an integer, got 'big'"),
    (["--set=hidden_size"], "is not of the form key=value"),
    (["--lr=0.1", "--set=train.learning_rate=0.2"], "--lr and --set train.learning_rate=0.2 both set "
                                                    "train.learning_rate"),
    (["--mesh=data=3"], "run.mesh: mesh data=3,expert=1,sequence=1,tensor=1 needs 3 devices"),
    (["--resume", "--lr=1e-3"], "would change settings fixed for the run: train.learning_rate: 0.003 -> 0.001"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    if "--resume" in args:
        _refusable_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", *args],
                          cwd=launch.ROOT, env=launch.env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
