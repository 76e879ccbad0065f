"""Bad generation input is refused before any compile, with a message that names the problem."""
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import generate as gen
from m1jax.config import ModelConfig
from m1jax.model import init_model

CFG = ModelConfig.tiny(max_position_embeddings=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
])
def test_sampling_settings_out_of_their_domain(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.Sampling.make(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop_tokens=[-1]), "stop tokens must be token ids >= 0"),
    (dict(truncate_after=-3), "truncate_after must be an integer >= 0"),
    (dict(truncate_prob=1.5), r"truncate_prob must be in \[0, 1\]"),
])
def test_stop_rules_out_of_their_domain(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.StopRules.make(**kwargs)


@pytest.mark.parametrize("prompts, new, stop, message", [
    ([[1, 2, 256]], 4, None, r"prompt 0: token ids must be in \[0, vocab_size=256\); got min 1, max 256"),
    ([[3], [-2, 5]], 4, None, r"prompt 1: token ids must be in \[0, vocab_size=256\); got min -2"),
    ([[1.5, 2]], 4, None, "non-integer token ids"),
    ([[]], 4, None, "non-empty"),
    ([[1] * 60], 8, None, "60 tokens \\+ max_new_tokens 8 exceed the model's max_position_embeddings=64"),
    ([[1, 2]], 0, None, "max_new_tokens must be a positive integer"),
    ([[1, 2]], 4, gen.StopRules.make([7, 300]), r"stop tokens \[300\] are not in the vocabulary"),
])
def test_requests_are_checked_against_the_model(prompts, new, stop, message):
    with pytest.raises(ValueError, match=message):
        gen.check_request(CFG, prompts, new, stop)


def test_generate_refuses_before_compiling():
    model = init_model(CFG)
    before = dict(gen.TRACE_COUNTS)
    with pytest.raises(ValueError, match="vocab_size"):
        gen.generate(model, [[1, 2, 999]], max_new_tokens=2)
    assert dict(gen.TRACE_COUNTS) == before


def test_model_refuses_positions_and_lengths_past_its_table():
    model = init_model(CFG)
    with pytest.raises(ValueError, match=r"positions must be in \[0, max_position_embeddings=64\)"):
        model(jnp.zeros((1, 4), jnp.int32), positions=jnp.asarray([[0, 1, 2, 64]]))
    with pytest.raises(ValueError, match="sequence of 65 tokens exceeds max_position_embeddings=64"):
        model(jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(jnp.asarray(np.array([[0, -1]], np.int32)))
