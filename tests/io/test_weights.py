"""From any checkpoint to text: converted parameter directories (atomic, resumable), training and RL run directories,
policy directories, and the export to HF; every loader against the arrays that were saved."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import weights
from m1jax.config import ModelConfig, m1_layer_types
from m1jax.convert import export_hf, from_hf
from m1jax.model import init_model
from m1jax.safetensors_io import CheckpointError
from m1jax.train import RunConfig, TrainConfig, Trainer, split_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig.tiny(vocab_size=32, hidden_size=32, num_hidden_layers=2, layer_types=m1_layer_types(2, 2),
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, rotary_dim=16, intermediate_size=32,
                       num_local_experts=2, max_position_embeddings=64)


def _assert_same_params(got, want):
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step training run directory and its final parameters."""
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer = Trainer(CFG, TrainConfig(total_steps=2), RunConfig(data="synthetic:add", batch=4, steps=2, save_every=1),
                      workdir, log=lambda _: None)
    state = trainer.fit()
    return workdir, jax.device_get(state.params)


def test_run_directory_loads_its_latest_parameters(trained_run):
    workdir, params = trained_run
    assert weights.checkpoint_kind(workdir) == "run"
    cfg, graphdef, loaded = weights.load_weights(workdir, overrides=["compute_dtype=bfloat16"])
    assert cfg.architecture == CFG.architecture and cfg.compute_dtype == "bfloat16"
    _assert_same_params(loaded, params)
    with pytest.raises(CheckpointError, match=r"change the stored architecture \(\['hidden_size'\]\)"):
        weights.load_weights(workdir, overrides=["hidden_size=64"])


def test_policy_directory_loads(tmp_path):
    from m1jax.rl.policy import save_policy
    graphdef, params = split_model(init_model(CFG, seed=3))
    save_policy(str(tmp_path / "policy"), CFG, params)
    assert weights.checkpoint_kind(tmp_path / "policy") == "checkpoints"
    _, _, loaded = weights.load_weights(tmp_path / "policy")
    _assert_same_params(loaded, params)


def test_export_then_convert_round_trip_and_resume(trained_run, tmp_path, monkeypatch):
    workdir, params = trained_run
    hf = tmp_path / "hf"
    weights.export_to_hf(workdir, hf, dialect="transformers")
    assert weights.checkpoint_kind(hf) == "hf"
    cfg, model = from_hf(hf)
    _assert_same_params(nnx.state(model, nnx.Param), params)
    with pytest.raises(weights.OutputExists, match="already exists"):
        weights.export_to_hf(workdir, hf)

    # A conversion that fails halfway leaves only <out>.partial; the rerun resumes it and keeps what was written.
    from m1jax import checkpoint
    real_save, calls = checkpoint.save_params_leaf, []

    def failing_save(directory, name, array):
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        calls.append(name)
        real_save(directory, name, array)

    monkeypatch.setattr(checkpoint, "save_params_leaf", failing_save)
    out = tmp_path / "params_dir"
    with pytest.raises(OSError, match="injected"):
        weights.convert_hf(hf, out, log=lambda _: None)
    assert not out.exists() and (tmp_path / "params_dir.partial").is_dir()
    monkeypatch.setattr(checkpoint, "save_params_leaf", real_save)
    with pytest.raises(weights.OutputExists, match="partial conversion of"):
        weights.convert_hf(hf, out, ["param_dtype=bfloat16"], log=lambda _: None)  # different settings: refused
    stats = weights.convert_hf(hf, out, log=lambda _: None)
    assert stats["resumed"] == 3 and stats["parameters"] == len(jax.tree_util.tree_leaves(params)) - 3
    assert not (tmp_path / "params_dir.partial").exists()
    assert weights.checkpoint_kind(out) == "params"
    _, _, loaded = weights.load_weights(out)
    _assert_same_params(loaded, params)
    with pytest.raises(weights.OutputExists, match="already exists"):
        weights.convert_hf(hf, out, log=lambda _: None)


def test_checkpoint_kind_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        weights.checkpoint_kind(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        weights.checkpoint_kind(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weights"):
        weights.checkpoint_kind(tmp_path)


def test_generate_entry_point_reads_a_run_directory(trained_run):
    from m1jax import generate as gen
    workdir, params = trained_run
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "experiments.generate", f"--checkpoint={workdir}",
                           "--prompt=1 5 7", "--max_new_tokens=4", "--truncate_after=0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    graphdef, _ = split_model(init_model(CFG))
    want = gen.generate((graphdef, jax.tree_util.tree_map(jnp.asarray, params)), [[1, 5, 7]], max_new_tokens=4,
                        sampling=gen.Sampling.greedy(), stop=gen.StopRules.make((), truncate_after=0))
    tokens = " ".join(map(str, np.asarray(want.tokens[0, :int(want.lengths[0])]).tolist()))
    assert f"\n{tokens}\n" in proc.stdout, proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/nonexistent/run"], "does not exist"),
    (["--prompt=hello"], "whitespace-separated token ids"),
    (["--prompt=1 2", "--temperature=-1"], "temperature must be >= 0"),
    (["--prompt=1 2 999"], "vocab_size=256"),
    (["--prompt=1", "--checkpoint=/a", "--params_dir=/b"], "give one of"),
])
def test_generate_entry_point_user_errors(args, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_run_directory_parameters_are_verified(trained_run, tmp_path):
    """A flipped byte in a saved parameter chunk is refused when only the parameters are read."""
    import shutil
    workdir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    from m1jax.checkpoint import saved_steps
    step_dir = copy / "checkpoints" / str(max(saved_steps(copy / "checkpoints"))) / "state"
    chunks = sorted(p for p in step_dir.rglob("*") if p.is_file() and "d" in p.parts[-2:-1] and p.stat().st_size > 64)
    assert chunks, list(step_dir.rglob("*"))[:10]
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[0].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="differ from the digest|damaged"):
        weights.load_weights(copy)
