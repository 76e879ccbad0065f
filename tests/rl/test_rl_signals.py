"""SIGTERM during an RL run (what a scheduler sends before preempting): the run saves its state at the next step and
exits cleanly, and ``--resume`` continues from that step to the end, through the entry point a user runs."""
import os
import signal
import subprocess
import sys

from m1jax.checkpoint import saved_steps
from m1jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--layers=2", "--period=2", "--hidden=16", "--heads=2", "--head_dim=8", "--experts=2", "--ffn=16",
        "--max_digits=1", "--sft_steps=5", "--prompts=2", "--group_size=2", "--mu=1", "--rl_steps=12",
        "--eval_every=1", "--eval_problems=4", "--eval_samples=1"]


ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _argv(workdir, *args):
    return [sys.executable, "-m", "experiments.rl", f"--workdir={workdir}", *TINY, *args]


def test_sigterm_saves_the_step_and_resume_finishes_the_run(tmp_path):
    proc = subprocess.Popen(_argv(tmp_path), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:  # the evaluation line of RL step 2: the loop is running
        seen.append(line)
        if "] step    2" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    stopped = [line for line in out.splitlines() if "stop requested: state saved at step" in line]
    assert stopped, out
    step = int(stopped[-1].rsplit(" ", 1)[1])
    assert 2 <= step < 12 and saved_steps(tmp_path / "checkpoints") == [step], out

    resumed = subprocess.run(_argv(tmp_path, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at RL step {step}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(0, 13)), steps  # every step once: none lost, none repeated
    assert saved_steps(tmp_path / "checkpoints")[-1] == 12
