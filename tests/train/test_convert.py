"""HF checkpoint -> experiments.convert (streaming orbax) -> load_params onto a mesh -> logits equal transformers'."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from m1jax import checkpoint as C
from m1jax import train as T
from m1jax.config.files import load_model_config
from m1jax.weights import convert_hf
from m1jax.model import MiniMaxM1
from sharding.mesh import make_mesh
from sharding.rules import state_shardings
from tests.parity import hf_runner as hr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = hr.tiny_hf_config()
    ids = np.asarray(hr.random_ids(2, 11, cfg["vocab_size"], seed=5))
    # No skip when the transformers environment is missing: hr.ParityEnvError makes these tests ERROR, because this
    # module is the only test of experiments.convert and checkpoint.load_params and a skip would hide their failures.
    result = hr.run_reference(hr.make_request(cfg, [hr.forward_job("fwd", ids), hr.save_job()], seed=4),
                              tmp_path_factory.mktemp("hf"))
    return result, ids


@pytest.mark.parametrize("which", ["hf_sharded", "minimax_names"])
def test_convert_restore_logits_match_transformers(reference, which, tmp_path):
    result, ids = reference
    out = tmp_path / "orbax"
    if which == "hf_sharded":  # the entry point, as a user runs it
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "experiments.convert", f"--hf_dir={result.checkpoint_dir(which)}",
                               f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-2000:]
        again = subprocess.run([sys.executable, "-m", "experiments.convert", f"--hf_dir={result.checkpoint_dir(which)}",
                                f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    else:
        stats = convert_hf(str(result.checkpoint_dir(which)), str(out), log=lambda _: None)
    assert not (tmp_path / "orbax.partial").exists()
    cfg = load_model_config(str(out))
    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, abstract_params = T.split_model(abstract)
    if which != "hf_sharded":  # the largest host buffer is one parameter, far below the whole model
        assert stats["peak_buffer_bytes"] == max(x.size * 4 for x in jax.tree_util.tree_leaves(abstract_params))
    mesh = make_mesh("data=2,expert=2,tensor=2")
    params = C.load_params(out / "params", C.with_shardings(abstract_params, state_shardings(abstract_params, mesh)))
    experts_w1 = params["periods"]["layers"][0]["block_sparse_moe"]["w1"][...]
    assert experts_w1.sharding.spec[1] == "expert"  # restored straight onto the mesh, experts split
    logits = nnx.merge(graphdef, params)(ids).logits
    np.testing.assert_allclose(np.asarray(logits), result.array("fwd"), atol=1e-4, rtol=0)


def test_convert_refuses_incomplete_checkpoint(reference, tmp_path):
    import shutil

    from m1jax.safetensors_io import CheckpointError, open_checkpoint_dir, save_file

    result, _ = reference
    src = result.checkpoint_dir("hf_saved")
    work = tmp_path / "hf"
    shutil.copytree(src, work)
    opened = open_checkpoint_dir(work)
    tensors = {n: np.array(f.get(n)) for n, f in opened.items() if n != "model.norm.weight"}
    for f in work.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, work / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        convert_hf(str(work), str(tmp_path / "out"), log=lambda _: None)
