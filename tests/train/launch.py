"""Running ``python -m experiments.train`` in subprocesses: one process or several joined through jax.distributed
on 127.0.0.1, with fake CPU devices; reading back their metrics."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from m1jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# The tiny preset cut to its smallest useful size: one (lightning, softmax) period, 32 wide, 32-token vocabulary.
TINY = ["--config=tiny", "--set=model.num_hidden_layers=2", "--set=hidden_size=32", "--set=intermediate_size=32",
        "--set=vocab_size=32"]


def env(devices: int) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, *args, devices: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def start_processes(workdir, *args, processes: int, devices: int) -> list[subprocess.Popen]:
    """``processes`` trainers joined through --coordinator_address / --num_processes / --process_id."""
    address = f"127.0.0.1:{free_port()}"
    return [start(workdir, *args, f"--coordinator_address={address}", f"--num_processes={processes}",
                  f"--process_id={i}", devices=devices) for i in range(processes)]


def wait_for(proc: subprocess.Popen, marker: str, timeout: float = 240) -> list[str]:
    """Lines up to the first containing ``marker``; kills the process and fails if it does not come in time."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"no {marker!r} in output:\n{''.join(lines[-30:])}")


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Every process's remaining output, after each exited 0 (a timeout or a failure fails the test)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def losses(workdir) -> list[tuple[int, float, float]]:
    """(step, loss, grad_norm) of every record in metrics.jsonl, in file order."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(workdir)]
