"""The jitted RL update (m1jax/rl/step.py) and rollout (m1jax/rl/rollout.py) against independent references.

* trainer log-probs of left-padded rows == the model run on each row without padding (float64 head);
* the FP32 LM head is the default, and turning it off is what moves the trainer away from an fp32 sampler;
* the mu-minibatch scan == a hand-written loop of single optax updates on the model's own forward pass, with
  log pi_old from the sampler and (old_logp="trainer") from a plain forward of the pre-update params;
* no recompilation across RL steps of the learner (new params, new rollouts, same shapes, switching arms).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m1jax import generate
from m1jax.config import ModelConfig, m1_layer_types
from m1jax.model import init_model
from m1jax.rl import rollout, scoring, step
from m1jax.rl.learner import Learner
from m1jax.rl.losses import policy_loss
from m1jax.rl.task import encode_prompts
from m1jax.rl.tasks import ArithmeticTask, CharTokenizer
from m1jax.train import split_model
from tests.rl import toy

TOKENIZER = CharTokenizer()
TASK = ArithmeticTask(min_digits=1, max_digits=2)
N_NEW = TASK.max_answer_tokens


def _config(**overrides):
    # Two layers, one of each kind (lightning then softmax): the M1 pattern at the smallest size that compiles fast.
    base = dict(vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_hidden_layers=2, layer_types=m1_layer_types(2, 2),
                num_attention_heads=2, num_key_value_heads=2, head_dim=8, rotary_dim=4, intermediate_size=32,
                num_local_experts=4, block_size=8, max_position_embeddings=64)
    base.update(overrides)
    return ModelConfig.tiny(**base)


def _rollout_batch(graphdef, params, seed, num_groups=4, group_size=4):
    """A rollout of the arithmetic task as host arrays: tokens [R, P + N], start, response_mask, sampler_logp."""
    problems = TASK.sample(np.random.default_rng(seed), num_groups)
    tokens, start = rollout.repeat_rows(*encode_prompts(TASK, problems), group_size)
    out = rollout.sample(graphdef, params, tokens, start, jax.random.key(seed),
                         rollout.RolloutConfig(group_size=group_size), pad_id=TASK.pad_id, stop_ids=TASK.stop_ids,
                         max_new_tokens=N_NEW)
    host = jax.device_get({"tokens": out.tokens, "start": out.start, "response_mask": out.response_mask,
                           "sampler_logp": out.sampler_logp})
    return host, problems


def _synthetic_batch(samples, seed):
    """An update batch from real samples with random advantages (an untrained model earns no reward) and a sampler
    log-prob perturbed away from the trainer's, so that the ratios are off 1 and clipping is exercised."""
    rng = np.random.default_rng(seed)
    b = samples["tokens"].shape[0]
    return {"tokens": samples["tokens"], "start": samples["start"], "mask": samples["response_mask"],
            "sampler_logp": samples["sampler_logp"] + rng.normal(0, 0.3, samples["sampler_logp"].shape).astype(
                np.float32),
            "advantages": rng.normal(size=b).astype(np.float32),
            "group_ids": np.repeat(np.arange(b // 4, dtype=np.int32), 4)}


def _reference_logprobs(model, tokens, start, n_new, head_scale=1.0):
    """[B, N] float64: each row run alone without its left padding, the LM head in float64."""
    kernel = np.asarray(model.lm_head.kernel[...], np.float64) * head_scale
    p = tokens.shape[1] - n_new
    out = np.zeros((tokens.shape[0], n_new))
    for i, (row, s) in enumerate(zip(np.asarray(tokens), np.asarray(start))):
        valid = jnp.asarray(row[s:][None])
        hidden = np.asarray(model(valid, return_hidden=True).hidden[0], np.float64)
        logits = hidden @ kernel
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        first = p - s  # index of the first response token in the unpadded row
        out[i] = logp[np.arange(first - 1, first - 1 + n_new), row[p:]]
    return out


@pytest.fixture(scope="module")
def policy():
    model = init_model(_config(), seed=0)
    graphdef, params = split_model(model)
    samples, problems = _rollout_batch(graphdef, params, seed=0)
    return model, graphdef, params, samples, problems


def test_trainer_logprobs_match_unpadded_rows_and_sampler(policy):
    model, graphdef, params, samples, _ = policy
    assert len(set(samples["start"].tolist())) > 1, "want prompts of different lengths (different left padding)"
    got = np.asarray(step.response_logprobs(graphdef, params, jnp.asarray(samples["tokens"]),
                                            jnp.asarray(samples["start"]), N_NEW))
    ref = _reference_logprobs(model, samples["tokens"], samples["start"], N_NEW)
    mask = samples["response_mask"] > 0
    np.testing.assert_allclose(got[mask], ref[mask], atol=2e-5)
    # The sampler (cached decode) recorded the same probabilities: train/infer agree in fp32.
    np.testing.assert_allclose(samples["sampler_logp"][mask], ref[mask], atol=2e-5)
    assert np.all(samples["sampler_logp"][~mask] == 0)


def test_fp32_head_is_the_default():
    assert step.UpdateConfig().fp32_head and ModelConfig().lm_head_fp32
    # bf16 body; a large head kernel mimics M1's high-magnitude LM-head activations, so a bf16 head is visibly off.
    model = init_model(_config(compute_dtype="bfloat16"), seed=1)
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 50.0
    graphdef, params = split_model(model)
    tokens, start = _fixed_rows()
    b = tokens.shape[0]
    # The "sampler" is an fp32-head reference on the same bf16 body (segment ids mask the left padding there too).
    segment_ids = (np.arange(tokens.shape[1])[None] >= start[:, None]).astype(np.int32)
    hidden = np.asarray(model.backbone(jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids)).hidden,
                        np.float64)[:, -N_NEW - 1:-1]
    logits = hidden @ np.asarray(model.lm_head.kernel[...], np.float64)
    logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    sampler_logp = np.take_along_axis(logp, tokens[:, -N_NEW:, None], -1)[..., 0].astype(np.float32)
    batch = {"tokens": tokens, "start": start, "mask": np.ones((b, N_NEW), np.float32), "sampler_logp": sampler_logp,
             "advantages": np.zeros(b, np.float32), "group_ids": np.zeros(b, np.int32)}
    errors = {}
    for fp32 in (True, False):
        ucfg = step.UpdateConfig(mu=1) if fp32 else step.UpdateConfig(mu=1, fp32_head=False)
        _, _, metrics = step.rl_update(params, step.init_opt_state(params, ucfg), batch, graphdef=graphdef, ucfg=ucfg)
        errors[fp32] = float(metrics["mismatch_max_abs_logp"][0])
    assert errors[True] < 1e-4, errors
    assert errors[False] > 30 * errors[True] and errors[False] > 1e-3, errors


def _fixed_rows():
    """Left-padded prompts ++ arbitrary response tokens: ([4, P + N] int32, start [4])."""
    problems = TASK.sample(np.random.default_rng(3), 4)
    prompts, start = generate.left_pad([[TOKENIZER.BOS] + TOKENIZER.encode(p.prompt) for p in problems],
                                       TASK.max_prompt_tokens)
    responses = np.random.default_rng(4).integers(3, 13, size=(4, N_NEW)).astype(np.int32)
    return np.concatenate([prompts, responses], 1), start


def _plain_logprobs(model, tokens, start):
    """[B, N] log-probs of the response tokens by the model's own forward (segment ids mask the left padding)."""
    p = tokens.shape[1] - N_NEW
    seg = (jnp.arange(tokens.shape[1])[None] >= start[:, None]).astype(jnp.int32)
    logp_all = jax.nn.log_softmax(model(tokens, segment_ids=seg).logits[:, p - 1:-1], axis=-1)
    return jnp.take_along_axis(logp_all, tokens[:, p:, None], axis=-1)[..., 0]


def _hand_loop(model, batch, loss, mu, knobs, lr):
    """mu single updates written out: the model's own forward, policy_loss on one minibatch (log pi_old =
    batch["sampler_logp"]), clip + AdamW.

    Returns (params, [mu] gradient global norms before clipping)."""
    graphdef, params = split_model(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
    opt_state = tx.init(params)
    b = batch["tokens"].shape[0]
    rows = b // mu
    total_tokens = float(batch["mask"].sum())

    def loss_fn(params, mb):
        logp = _plain_logprobs(nnx.merge(graphdef, params), mb["tokens"], mb["start"])
        # One normaliser for the whole rollout batch: total tokens / mu per minibatch.
        return policy_loss(loss, logp, mb["sampler_logp"], mb["advantages"], mb["mask"], agg="const_norm",
                           norm_constant=total_tokens / mu, **knobs)[0]

    norms = []
    for i in range(mu):
        mb = {k: jnp.asarray(v[i * rows:(i + 1) * rows]) for k, v in batch.items()}
        grads = jax.grad(loss_fn)(params, mb)
        norms.append(float(optax.tree.norm(grads)))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, np.array(norms)


def test_mu_minibatch_scan_equals_loop_of_single_updates(policy):
    model, graphdef, params, samples, _ = policy
    batch = _synthetic_batch(samples, seed=1)
    # The masked CISPO exercises both the IS-weight cap and PPO's token mask; the perturbed sampler log-probs put
    # tokens on both sides of each bound.
    loss, knobs, mu, lr = "cispo_masked", {"ratio_max": 1.28}, 2, 1e-2
    ucfg = step.UpdateConfig(loss=loss, **knobs, mu=mu, learning_rate=lr)
    # Compiled as the second arm of a multi-loss program (lax.switch), the path the reproduction grid uses.
    grpo = ucfg.with_loss("grpo")
    update = step.make_rl_update(graphdef, grpo, alternatives=(ucfg,))
    fresh = jax.tree_util.tree_map(jnp.copy, params)
    got, _, metrics = update(fresh, step.init_opt_state(fresh, ucfg), batch, arm=1)
    want, want_norms = _hand_loop(model, batch, loss, mu, knobs, lr)
    # Adam is nearly invariant to the gradient's scale, so check the gradients' norms (the shared normaliser) too.
    np.testing.assert_allclose(metrics["grad_norm"], want_norms, rtol=1e-4)
    assert 0.05 < metrics["is_cap_frac"][0] < 0.95 and 0.05 < metrics["ppo_clip_frac"][0] < 0.95, metrics
    # Parameters to well under one step of size lr (Adam moves every parameter by about lr per update).
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-3 * lr, err_msg=str(path))
    moved = max(float(np.max(np.abs(np.asarray(g) - np.asarray(p))))
                for g, p in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)))
    assert moved > lr, "the update did not move the parameters"
    assert metrics["loss"].shape == (mu,)


def test_old_logp_from_the_trainer(policy):
    """old_logp="trainer": log pi_old recomputed by the trainer before the first minibatch == the hand loop with
    log pi_old from a plain forward of the pre-update params; the perturbed sampler log-probs are then ignored."""
    model, graphdef, params, samples, _ = policy
    batch = _synthetic_batch(samples, seed=3)
    loss, knobs, mu, lr = "cispo_masked", {"ratio_max": 1.28}, 2, 1e-2
    trainer_logp = np.asarray(_plain_logprobs(model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["start"])))
    # Had the sampler's (perturbed) log-probs been used, minibatch 0 would cap and mask many tokens.
    active = batch["mask"] > 0
    assert np.mean(np.exp(trainer_logp - batch["sampler_logp"])[active] > 1.28) > 0.05
    ucfg = step.UpdateConfig(loss=loss, **knobs, mu=mu, learning_rate=lr, old_logp="trainer")
    fresh = jax.tree_util.tree_map(jnp.copy, params)
    got, _, metrics = step.make_rl_update(graphdef, ucfg)(fresh, step.init_opt_state(fresh, ucfg), batch)
    want, want_norms = _hand_loop(model, dict(batch, sampler_logp=trainer_logp), loss, mu, knobs, lr)
    np.testing.assert_allclose(metrics["grad_norm"], want_norms, rtol=1e-4)
    # At the pre-update params r = 1 on minibatch 0: nothing is capped or masked there.
    assert metrics["is_cap_frac"][0] == 0 and metrics["ppo_clip_frac"][0] == 0, metrics
    assert metrics["is_cap_frac"][1] > 0 or metrics["ppo_clip_frac"][1] > 0, metrics  # lr 1e-2 moves r off 1
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-3 * lr)


def test_no_recompilation_across_rl_steps():
    learner, params = toy.learner()
    dapo = learner.arms[0].with_loss("dapo")
    learner = Learner(learner.graphdef, learner.task, config=learner.config, update=learner.arms[0],
                          rollout=learner.rollout_config, alternatives=(dapo,))
    state = learner.init_state(params)
    counts = []
    for i in range(3):  # new params, new rollouts, switching arms
        state, record = learner.step(state, arm=i % 2)
        counts.append((step.TRACE_COUNTS["rl_update"], rollout.TRACE_COUNTS["sample"],
                       scoring.TRACE_COUNTS["gather"]))
        assert record["kept_groups"] > 0, record
    assert counts[0] == counts[1] == counts[2], counts


def test_alternative_learning_rates_in_one_program_match_single_arm_updates(policy):
    """An arm with its own learning rate (bench_rl's ``dapo@3e-5``) compiled beside others == its own update."""
    _, graphdef, params, samples, _ = policy
    batch = _synthetic_batch(samples, seed=2)
    base = step.UpdateConfig(loss="dapo", mu=2, learning_rate=1e-2, warmup_steps=1)
    slow = base.with_loss("cispo", ratio_max=2.0).replace(learning_rate=1e-3)
    update = step.make_rl_update(graphdef, base, alternatives=(slow,))
    for arm, ucfg in enumerate((base, slow)):
        fresh = jax.tree_util.tree_map(jnp.copy, params)
        got, _, _ = update(fresh, step.init_opt_state(fresh, ucfg), batch, arm=arm)
        fresh = jax.tree_util.tree_map(jnp.copy, params)
        want, _, _ = step.make_rl_update(graphdef, ucfg)(fresh, step.init_opt_state(fresh, ucfg), batch)
        moved = max(float(np.max(np.abs(np.asarray(w) - np.asarray(p))))
                    for w, p in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(params)))
        # warm-up of 1 update: minibatch 0 moves nothing, minibatch 1 moves by about its lr
        assert 0.3 * ucfg.learning_rate < moved < 3 * ucfg.learning_rate, (arm, moved)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4 * ucfg.learning_rate)
    with pytest.raises(ValueError, match="more than loss"):
        step.make_rl_update(graphdef, base, alternatives=(slow.replace(mu=1),))(
            jax.tree_util.tree_map(jnp.copy, params), step.init_opt_state(params, base), batch)
