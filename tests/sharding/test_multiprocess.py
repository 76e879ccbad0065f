"""Two CPU processes (4 fake devices each) joined through jax.distributed on 127.0.0.1 compute the same loss and
gradients on a 2x2x2 mesh as the single-process, single-device computation."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import tiny_model as H

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "result.npz"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.distributed_worker", str(out),
                               "data=2,expert=2,sequence=2"], cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"two-process run did not finish in {TIMEOUT_S}s")
    if any(p.returncode for p in procs):
        # No skip for "UNIMPLEMENTED" and the like: jax's CPU client runs multi-process collectives here, so such an
        # error comes from what the code under test asked for, and must fail the test.
        pytest.fail(f"worker failed:\n{chr(10).join(logs)[-4000:]}")

    result = np.load(out)
    assert int(result["processes"]) == 2 and int(result["devices"]) == 8
    cfg = H.tiny_config()
    _, params = H.init(cfg)
    tokens, segments = H.batch(cfg)
    loss_ref, grads_ref = H.loss_and_grads(cfg, params, tokens, segments)
    np.testing.assert_allclose(float(result["loss"].reshape(-1)[0]), float(loss_ref), rtol=1e-5)
    ref_leaves = jax.tree_util.tree_leaves(grads_ref)
    H.assert_close_tree([result[f"g{i}"] for i in range(len(ref_leaves))], ref_leaves)
