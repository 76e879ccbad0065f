"""Greedy generation against transformers' ``generate`` (and its manual greedy loop with explicit positions) on the
tiny M1-pattern model of docs/model.md §8; rotary_dim = head_dim because transformers rotates the whole head.

Our batch mixes prompt lengths (left padding); transformers generates each prompt alone, unpadded. (Found while
writing this: transformers 5.24.0's *left-padded* batch generation for this model drifts from the same prompt
generated alone from the first cached step on (step logits differ by ~2.5), so its padded batch is no reference.)
"""
import jax
import jax.numpy as jnp
import numpy as np

from m1jax import generate as gen
from m1jax.convert import from_hf
from tests.parity import hf_runner as hr

NEW = 6


def test_greedy_generation_matches_transformers(hf_reference_cache):
    cfg = hr.tiny_hf_config()
    ids = hr.random_ids(2, 11, cfg["vocab_size"], seed=21)
    prompts = [ids[0][4:], ids[1]]  # lengths 7 and 11
    jobs = [hr.generate_job(f"row{i}", [p], NEW) for i, p in enumerate(prompts)]
    ref = hr.run_reference(hr.make_request(cfg, jobs + [hr.save_job()], seed=4), hf_reference_cache)
    _, model = from_hf(ref.checkpoint_dir("hf_saved"))
    out = gen.generate(model, prompts, max_new_tokens=NEW, sampling=gen.Sampling.greedy(), chunk_size=4,
                       kv_dtype="float32", stop=gen.StopRules.make(truncate_after=0))
    for i in range(len(prompts)):
        assert ref.job(f"row{i}")["generate_matches_manual"]
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), ref.array(f"row{i}", "generate_tokens")[0])
        want = jax.nn.log_softmax(jnp.asarray(ref.array(f"row{i}", "step_logits")[0]), axis=-1)
        want = np.take_along_axis(np.asarray(want), np.asarray(out.tokens[i])[:, None], -1)[:, 0]
        np.testing.assert_allclose(np.asarray(out.model_logprobs[i]), want, rtol=0, atol=1e-4)
