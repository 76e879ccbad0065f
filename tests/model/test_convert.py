"""The HF converter: name coverage of the published checkpoint, round trips, and errors that name the tensor."""
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.config import ModelConfig
from m1jax.convert import expected_tensors, export_hf, from_hf
from m1jax.model import init_model
from m1jax.safetensors_io import CheckpointError, open_checkpoint_dir, save_file

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "minimax-m1")
CFG = ModelConfig.tiny(initializer_range=0.2, block_size=256)  # MiniMax's dialect carries no block_size


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13)), jnp.int32)


def _published_index():
    with open(os.path.join(DATA, "model.safetensors.index.json")) as fh:
        return json.load(fh)["weight_map"]


def test_name_map_covers_every_published_tensor():
    weight_map = _published_index()
    expected = expected_tensors(ModelConfig.m1(), "minimax")
    assert len(weight_map) == 8243
    assert set(expected) == set(weight_map)
    total = sum(int(np.prod(s)) for s in expected.values())
    assert total == ModelConfig.m1().param_counts()["total"]


def test_loads_a_checkpoint_sharded_like_the_published_index(model, tokens, tmp_path):
    """Same file layout as MiniMax's index (embedding alone in shard 0, layer i in shard i+1, ...), scaled down."""
    published = _published_index()
    layer_file = {}
    for name, fname in published.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        key = int(m.group(1)) if m else name
        layer_file.setdefault(key, fname)
    src = tmp_path / "single"
    export_hf(model, src, dialect="minimax")
    single = open_checkpoint_dir(src)
    shards: dict[str, dict] = {}
    weight_map = {}
    for name in single:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        fname = layer_file[int(m.group(1))] if m else layer_file[name]
        shards.setdefault(fname, {})[name] = np.asarray(single[name].get(name))
        weight_map[name] = fname
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    for fname, tensors in shards.items():
        save_file(tensors, dst / fname)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(shards) > 3
    _, loaded = from_hf(dst)
    np.testing.assert_array_equal(np.asarray(loaded(tokens).logits), np.asarray(model(tokens).logits))


@pytest.mark.parametrize("dialect", ["minimax", "transformers"])
@pytest.mark.parametrize("shard_bytes", [None, 60_000])
def test_export_then_load_is_exact(model, tokens, tmp_path, dialect, shard_bytes):
    export_hf(model, tmp_path, dialect=dialect, max_shard_bytes=shard_bytes)
    cfg, loaded = from_hf(tmp_path)
    assert cfg == CFG.replace(initializer_range=cfg.initializer_range)
    np.testing.assert_array_equal(np.asarray(loaded(tokens).logits), np.asarray(model(tokens).logits))


def test_bf16_checkpoint_keeps_router_fp32(model, tmp_path):
    import ml_dtypes
    export_hf(model, tmp_path, dialect="minimax", dtype=ml_dtypes.bfloat16)
    f = open_checkpoint_dir(tmp_path)
    assert f["model.layers.0.block_sparse_moe.gate.weight"].get("model.layers.0.block_sparse_moe.gate.weight"
                                                                 ).dtype == np.float32
    assert f["lm_head.weight"].get("lm_head.weight").dtype == ml_dtypes.bfloat16
    _, loaded = from_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(loaded.periods.layers[0].block_sparse_moe.gate[...][0]),
                                  np.asarray(model.periods.layers[0].block_sparse_moe.gate[...][0]))


def _rewrite(path, edit):
    f = open_checkpoint_dir(path)
    tensors = {n: np.array(f[n].get(n)) for n in f}
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_missing_unexpected_and_misshaped_tensors_are_named(model, tmp_path):
    export_hf(model, tmp_path, dialect="minimax")
    _rewrite(tmp_path, lambda t: t.pop("model.layers.3.self_attn.out_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.3\.self_attn\.out_proj\.weight"):
        from_hf(tmp_path)
    export_hf(model, tmp_path, dialect="minimax")
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mystery\.weight"):
        from_hf(tmp_path)
    export_hf(model, tmp_path, dialect="minimax")
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \(7,\)"):
        from_hf(tmp_path)


def test_derived_decay_buffers_are_skipped(model, tokens, tmp_path):
    export_hf(model, tmp_path, dialect="minimax")
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.slope_rate": np.ones((4, 1, 1), np.float32)}))
    _, loaded = from_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(loaded(tokens).logits), np.asarray(model(tokens).logits))


def test_truncated_corrupt_and_pickled_checkpoints_are_refused(model, tmp_path):
    export_hf(model, tmp_path, dialect="minimax")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        from_hf(tmp_path)
    path.write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        from_hf(tmp_path)
    path.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="refuses pickle"):
        from_hf(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        from_hf(tmp_path / "nowhere")
