"""experiments.rl's policy checkpoints: a second save into the same directory (a rerun with the same --workdir)
replaces the first, and load_policy returns exactly the values saved last."""
import jax
import numpy as np

from experiments import rl
from m1jax.config import ModelConfig
from m1jax.model import init_model
from m1jax.train import split_model


def test_second_save_replaces_the_first(tmp_path):
    cfg = ModelConfig.tiny(num_hidden_layers=2, layer_types=("lightning", "softmax"))
    _, first = split_model(init_model(cfg, seed=0))
    _, second = split_model(init_model(cfg, seed=1))
    directory = str(tmp_path / "pretrained")
    rl.save_checkpoint(directory, cfg, {"params": first})
    rl.save_checkpoint(directory, cfg, {"params": second})  # orbax alone refuses: step 0 already exists
    loaded_cfg, _, params = rl.load_policy(directory)
    assert loaded_cfg == cfg
    for got, want, other in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(second),
                                jax.tree_util.tree_leaves(first)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(second), jax.tree_util.tree_leaves(first)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained"]  # no .writing / .old left behind
