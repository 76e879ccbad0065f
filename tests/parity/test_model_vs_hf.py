"""m1jax against transformers' MiniMaxForCausalLM (PyTorch, fp32, CPU), computed live in a Python 3.11 process.

Every checkpoint transformers writes (single file, sharded index, and renamed to MiniMax's on-disk names with a
MiniMax-dialect config.json) is loaded with ``m1jax.convert.from_hf`` and must give transformers' logits. transformers
ignores ``rotary_dim`` (it rotates the whole head), so these configs use rotary_dim = head_dim; partial RoPE is tested
against NumPy in tests/model/test_layers.py.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.cache import HybridCache
from m1jax.convert import from_hf

from . import hf_runner as hr

TOL = 1e-4  # max |logit difference| in fp32 (the bar)

CASES = {
    # the base case: 4 layers [lin, lin, lin, full], H=4, KV=2, d=16, E=4, top-2, block 4; T=11 (3 blocks)
    "spec8": dict(config=hr.tiny_hf_config(), seed=0, length=11),
    # one M1 period (7 lightning + 1 softmax), 8 heads of 8 dims, GQA 4:1, odd length over block 8
    "m1_period": dict(config=hr.tiny_hf_config(num_layers=8, num_heads=8, num_kv_heads=2, head_dim=8,
                                               hidden_size=32, intermediate_size=24, num_experts=8, block_size=8,
                                               vocab_size=96), seed=1, length=13),
    # two periods (the scan runs twice), 2 heads, MQA, top-1 of 3 experts... top_k=1 over 4 experts
    "two_periods": dict(config=hr.tiny_hf_config(num_layers=16, num_heads=2, num_kv_heads=1, head_dim=16,
                                                 hidden_size=32, intermediate_size=16, num_experts=4, top_k=1,
                                                 block_size=4, vocab_size=64), seed=2, length=9),
}


def _reference(name, cache_dir):
    case = CASES[name]
    cfg, length = case["config"], case["length"]
    ids = np.asarray(hr.random_ids(2, length, cfg["vocab_size"], seed=case["seed"] + 10))
    pad = 3
    padded = ids.copy()
    padded[0, pad:] = ids[0, :length - pad]
    padded[0, :pad] = 0
    mask = np.ones_like(padded)
    mask[0, :pad] = 0
    jobs = [hr.forward_job("fwd", ids, output_router_logits=True),
            hr.forward_job("padded", padded, attention_mask=mask, position_ids="from_mask"),
            hr.decode_job("decode", ids, prefill=length - 4),
            hr.save_job()]
    result = hr.run_reference(hr.make_request(cfg, jobs, seed=case["seed"]), cache_dir)
    return result, ids, padded, pad


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, hf_reference_cache):
    return _reference(request.param, hf_reference_cache)


@pytest.mark.parametrize("which", ["hf_saved", "hf_sharded", "minimax_names"])
def test_logits_match_transformers(reference, which):
    result, ids, _, _ = reference
    cfg, model = from_hf(result.checkpoint_dir(which))
    assert cfg.rotary_dim == cfg.head_dim
    out = model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out.logits), result.array("fwd"), rtol=0, atol=TOL)
    # transformers' aux_loss is the unscaled Switch loss over all layers' router logits, like ours.
    assert abs(float(out.aux_loss) - float(result.job("fwd")["aux_loss"])) < 1e-5


def test_left_padded_batch_matches_transformers(reference):
    result, _, padded, pad = reference
    _, model = from_hf(result.checkpoint_dir("hf_saved"))
    cache = HybridCache.init(model.cfg, 2, padded.shape[1], kv_dtype="float32", start=jnp.asarray([pad, 0]))
    got = np.asarray(model(jnp.asarray(padded), cache=cache).logits)
    want = result.array("padded")
    np.testing.assert_allclose(got[0, pad:], want[0, pad:], rtol=0, atol=TOL)  # padded positions are meaningless
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=TOL)


def test_prefill_and_decode_match_transformers(reference):
    result, ids, _, _ = reference
    _, model = from_hf(result.checkpoint_dir("hf_saved"))
    prefill = ids.shape[1] - 4
    want = result.array("decode")
    cache = HybridCache.init(model.cfg, 2, ids.shape[1], kv_dtype="float32")
    out = model(jnp.asarray(ids[:, :prefill]), cache=cache)
    np.testing.assert_allclose(np.asarray(out.logits), want[:, :prefill], rtol=0, atol=TOL)
    for t in range(prefill, ids.shape[1]):
        out = model(jnp.asarray(ids[:, t:t + 1]), cache=out.cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), want[:, t], rtol=0, atol=TOL)
