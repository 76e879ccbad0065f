"""remat / remat_granularity change what the backward keeps, not the function: loss and gradients equal no remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ModelConfig, apply_overrides
from m1jax.model import MiniMaxM1, init_model

# Two periods, so the scan over periods has more than one step.
CFG = ModelConfig.tiny(initializer_range=0.2, num_hidden_layers=16)


def _loss_and_grads(model, cfg, tokens):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0))))
    params = nnx.state(model, nnx.Param)

    def loss_fn(p):
        out = nnx.merge(graphdef, p)(tokens[:, :-1])
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        return nll + 0.01 * out.aux_loss

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("granularity", ["period", "layer", "nested"])
def test_remat_granularity_gives_the_no_remat_loss_and_gradients(granularity):
    model = init_model(CFG, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 21)), jnp.int32)
    ref_loss, ref_grads = _loss_and_grads(model, CFG, tokens)
    loss, grads = _loss_and_grads(model, CFG.replace(remat=True, remat_granularity=granularity), tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    ref_leaves, leaves = jax.tree_util.tree_leaves(ref_grads), jax.tree_util.tree_leaves(grads)
    assert len(leaves) == len(ref_leaves) and any(float(jnp.abs(g).max()) > 0 for g in ref_leaves)
    # Per-leaf relative L2 error: the recomputed forward is fused (so rounded) differently from the saved one. With
    # per-layer remat one element of 16384 differed by 7.6e-6 relative and the embedding gradient by 1.2e-6 (L2);
    # "period" is within 1e-6. A wrong gradient is off by O(1).
    for path, g, r in zip(jax.tree_util.tree_leaves_with_path(ref_grads), leaves, ref_leaves):
        err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) if float(jnp.abs(r).max()) > 0 else float(
            jnp.abs(g).max())
        assert err <= 1e-5, (jax.tree_util.keystr(path[0]), err)


def test_remat_granularity_layer_checkpoints_each_layer():
    """The gradient's jaxpr has more checkpoints with per-layer remat than with per-period remat, and none adds none."""
    cfg = CFG.replace(remat=True, remat_granularity="layer")
    model = init_model(CFG, seed=3)
    tokens = jnp.zeros((1, 9), jnp.int32)

    def n_checkpoints(c):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: MiniMaxM1(c, rngs=nnx.Rngs(0))))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).logits.sum()))(
            nnx.state(model, nnx.Param))
        return str(jaxpr).count("checkpoint[") + str(jaxpr).count("remat")

    counts = [n_checkpoints(c) for c in (CFG, CFG.replace(remat=True), cfg)]
    assert counts[0] < counts[1] < counts[2], counts  # the model's own checkpoints (e.g. the MoE SwiGLU) in all


def test_remat_granularity_is_validated_and_settable_by_override():
    with pytest.raises(ValueError, match="remat_granularity"):
        ModelConfig.tiny(remat_granularity="block")
    cfg = apply_overrides(ModelConfig.tiny(), ["remat=true", "remat_granularity=layer"])
    assert cfg.remat and cfg.remat_granularity == "layer"
    with pytest.raises(ValueError, match="remat_granularity"):
        apply_overrides(ModelConfig.tiny(), ["remat_granularity=block"])
