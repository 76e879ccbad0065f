"""The train step: its loss against an independent full-logits computation, gradient accumulation, sharded ==
unsharded, M1's AdamW defaults, the schedules and the FLOP count."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import train as T
from m1jax.config import ConfigError, ModelConfig, m1_layer_types
from m1jax.data import rows_to_batch
from sharding.mesh import make_mesh

CFG = ModelConfig.tiny(num_hidden_layers=2, layer_types=m1_layer_types(2, 2), vocab_size=64, hidden_size=32,
                       intermediate_size=16, num_local_experts=4, router_aux_loss_coef=0.01)


def _batch(b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t + 1))
    cut = rng.integers(2, t, (b, 1))
    segs = np.where(np.arange(t + 1)[None] < cut, 1, 2).astype(np.int32)
    segs[0, -3:] = 0  # padding
    pos = np.where(segs == 1, np.arange(t + 1)[None], np.arange(t + 1)[None] - cut)
    return rows_to_batch(tokens, segs, pos)


def _reference_loss(params, graphdef, batch):
    model = nnx.merge(graphdef, params)
    out = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    logp = np.asarray(jax.nn.log_softmax(out.logits.astype(jnp.float64) if jax.config.x64_enabled else out.logits))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    return float((nll * mask).sum() / mask.sum()), float(out.aux_loss)


@pytest.fixture(scope="module")
def start():
    graphdef, state = T.create_train_state(CFG, T.TrainConfig(), seed=1)
    return graphdef, jax.device_get(state)


def test_loss_and_accumulation(start):
    graphdef, host_state = start
    batch = _batch()
    ref_loss, ref_aux = _reference_loss(host_state.params, graphdef, batch)
    tc = T.TrainConfig(learning_rate=1e-2, eps=1e-3, warmup_steps=0, ce_chunk_size=24)  # 64 = 2 x 24 + a 16 tail
    state, metrics = T.make_train_step(graphdef, tc)(jax.device_put(host_state), batch)
    metrics = T.host_metrics(metrics)
    assert int(state.step) == 1
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert metrics["aux_loss"] == pytest.approx(ref_aux, rel=1e-5)
    assert metrics["tokens"] == batch["loss_mask"].sum()

    # Accumulation splits the batch into micro-batches; the loss is still the mean over all masked tokens. The MoE
    # load-balancing loss is per micro-batch (as in every accumulating trainer), so compare with it switched off.
    no_aux, _ = T.abstract_train_state(CFG.replace(router_aux_loss_coef=0.0), tc)
    # Each accumulated step makes one AdamW update (its moments' count is 1), equal to the unaccumulated update.
    results = {}
    for accum in (1, 2, 4):
        tc_a = tc.replace(grad_accum=accum)
        state, m = T.make_train_step(no_aux, tc_a)(jax.device_put(host_state), batch)
        assert int(state.opt_state[1][0].count) == 1
        results[accum] = (T.host_metrics(m), jax.device_get(state.params))
    m1, p1 = results[1]
    for accum in (2, 4):
        ma, pa = results[accum]
        assert ma["loss"] == pytest.approx(m1["loss"], rel=1e-6)
        assert ma["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(pa)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                  jax.tree_util.tree_leaves(host_state.params))]
    assert max(moved) > 1e-3  # the step did update


def test_sharded_step_equals_unsharded(start):
    """The FSDP step on a data x expert x tensor mesh equals the one-device step: metrics, and every leaf of the
    updated params and AdamW moments (the first moment is 0.1 x each gradient, so this compares the gradients leaf
    by leaf, not only their global norm)."""
    graphdef, host_state = start
    # eps = 1e-3 keeps the first Adam update smooth in the gradient (with M1's 1e-15 it is lr * sign(g), which
    # reduction-order noise flips on gradients near zero).
    tc = T.TrainConfig(learning_rate=1e-2, eps=1e-3, warmup_steps=0)
    batch = _batch(b=8, seed=2)
    plain_state, plain = T.make_train_step(graphdef, tc)(jax.device_put(host_state), batch)
    mesh = make_mesh("data=2,expert=2,tensor=2")
    shardings = T.train_state_shardings(jax.eval_shape(lambda: host_state), mesh, fsdp=True)
    batch_sh = T.batch_shardings(mesh, batch["inputs"].shape)
    state, sharded = T.make_train_step(graphdef, tc, shardings, batch_sh, fsdp=True)(
        jax.device_put(host_state, shardings), jax.device_put(batch, batch_sh))
    for k in ("loss", "aux_loss", "grad_norm"):
        assert float(sharded[k]) == pytest.approx(float(plain[k]), rel=2e-5), k
    w1 = state.params["periods"]["layers"][0]["block_sparse_moe"]["w1"][...]
    assert w1.sharding.spec[1] == "expert"  # the state stays sharded across the step

    got, want = jax.device_get((state.params, state.opt_state)), jax.device_get((plain_state.params,
                                                                                plain_state.opt_state))
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    assert len(paths) == len(jax.tree_util.tree_leaves(got))
    for (path, b), a in zip(paths, jax.tree_util.tree_leaves(got)):
        scale = float(np.abs(b).max()) if np.size(b) else 0.0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale + 1e-9, err_msg=jax.tree_util.keystr(path))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(got[0]),
                                                            jax.tree_util.tree_leaves(host_state.params)))
    assert moved > 1e-3  # the update did move the params


def test_no_recompilation_across_steps_and_the_state_is_donated(start):
    """Same shapes, new data: the jitted step compiles once (a retrace recompiles the whole model). Every buffer of
    the input state is donated (the update writes params and moments in place, no second copy of the state)."""
    graphdef, host_state = start
    step = T.make_train_step(graphdef, T.TrainConfig(learning_rate=1e-3, warmup_steps=0))
    state = jax.device_put(host_state)
    for seed in range(3):
        old = state
        state, metrics = step(state, _batch(seed=seed))
        assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3
    assert step._cache_size() == 1


def test_m1_adamw_defaults_and_schedules():
    tc = T.TrainConfig()
    assert (tc.b1, tc.b2, tc.eps) == (0.9, 0.95, 1e-15)
    cos = T.make_schedule(T.TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, final_lr_ratio=0.1))
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
    for s in (10, 35, 60, 110):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
        assert float(cos(s)) == pytest.approx(want, rel=1e-5)
    lin = T.make_schedule(T.TrainConfig(learning_rate=2.0, schedule="linear", warmup_steps=0, total_steps=10,
                                        final_lr_ratio=0.0))
    assert [float(lin(s)) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    const = T.make_schedule(T.TrainConfig(learning_rate=3.0, schedule="constant", warmup_steps=2))
    assert [float(const(s)) for s in (0, 1, 2, 50)] == pytest.approx([0.0, 1.5, 3.0, 3.0])
    with pytest.raises(ConfigError, match=r"TrainConfig.schedule: must be one of \['cosine', 'linear', 'constant'\]"):
        T.TrainConfig(schedule="step")


def test_flops_per_token_by_hand():
    cfg = ModelConfig.m1()
    d, h, hd, v, e, f = 6144, 64, 128, 200064, 32, 9216
    lightning_layer = d * 3 * h * hd + d * h * hd + h * hd + h * hd * d
    softmax_layer = d * h * hd + 2 * d * 8 * hd + h * hd * d
    per_layer = 2 * 3 * d * f + d * e + 2 * d
    active = 70 * lightning_layer + 10 * softmax_layer + 80 * per_layer + d + v * d
    t = 8192
    want = 6 * active + 3 * 70 * 4 * h * hd * (64 + hd) + 3 * 10 * 2 * t * h * hd
    assert T.train_flops_per_token(cfg, t) == pytest.approx(want)
    assert 6 * active / 1e9 == pytest.approx(6 * 45.9 + 6 * 1.23, rel=0.02)  # 45.9B active + the LM head
