"""experiments.train end to end in subprocesses: 20 steps straight == 12 steps + SIGKILL + resume to 16 + SIGTERM
(save on signal, clean exit) + resume to 20, loss for loss in exact fp32; and --set errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--config=tiny", "--set=num_hidden_layers=2", "--set=hidden_size=32", "--set=intermediate_size=32",
        "--batch=4", "--steps=20", "--save_every=5", "--lr=3e-3", "--warmup=3", "--data=synthetic:add"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _start(workdir, cache, *extra):
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", f"--compilation_cache={cache}",
           *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, marker, timeout=240):
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"no {marker!r} in output:\n{''.join(lines[-30:])}")


def _losses(workdir):
    rows = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_kill_resume_matches_straight_run(tmp_path):
    cache = tmp_path / "xla_cache"
    straight = _start(tmp_path / "a", cache)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]
    reference = _losses(tmp_path / "a")
    assert [s for s, _, _ in reference] == list(range(1, 21))

    work = tmp_path / "b"
    proc = _start(work, cache, "--pause_at_step=12")
    _wait_for(proc, "PAUSED at step 12")
    proc.send_signal(signal.SIGKILL)  # hard kill: only the step-10 checkpoint survives
    proc.wait(timeout=30)
    assert sorted(os.listdir(work / "checkpoints")) == ["10", "5"]

    proc = _start(work, cache, "--resume", "--pause_at_step=16")
    lines = _wait_for(proc, "PAUSED at step 16")
    assert any("resumed from" in line and line.rstrip().endswith("/10") for line in lines)
    proc.send_signal(signal.SIGTERM)  # preemption: save step 16, exit 0
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "saving step 16" in out
    assert "16" in os.listdir(work / "checkpoints")

    proc = _start(work, cache, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]

    # metrics.jsonl holds steps 1-12, 11-16, 17-20 (the resumed runs repeat 11-12); each equals the straight run
    by_step = {}
    for step, loss, gnorm in _losses(work):
        by_step.setdefault(step, []).append((loss, gnorm))
    assert sorted(by_step) == list(range(1, 21))
    assert len(by_step[11]) == 2 and len(by_step[17]) == 1
    for step, loss, gnorm in reference:
        for got in by_step[step]:
            assert got == (loss, gnorm), f"step {step}: {got} != {(loss, gnorm)}"


@pytest.mark.parametrize("override,message", [
    ("--set=hiden_size=64", "unknown config key 'hiden_size'"),
    ("--set=hidden_size=big", "hidden_size: expected an integer, got 'big'"),
    ("--set=hidden_size", "is not of the form key=value"),
])
def test_override_errors(tmp_path, override, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", override],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
