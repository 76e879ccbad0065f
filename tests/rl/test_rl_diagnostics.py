"""Policy diagnostics (m1jax/rl/diagnostics.py): the fork statistics against the model's own forward pass on each
reference completion, split at the carry positions computed here; the probability summary by hand."""
import jax
import numpy as np
import pytest

from m1jax.config import ModelConfig, m1_layer_types
from m1jax.model import init_model
from m1jax.rl import diagnostics
from m1jax.rl.tasks import CharTokenizer, ColumnAdditionTask
from m1jax.train import split_model

TASK = ColumnAdditionTask(min_digits=2, max_digits=4)
TOK = CharTokenizer()


def test_probability_stats_by_hand():
    stats = diagnostics.probability_stats(np.array([0.05, 0.2, 0.4, 0.9]))
    assert stats["tokens"] == 4 and stats["mean"] == pytest.approx(0.3875) and stats["q50"] == pytest.approx(0.3)
    assert (stats["frac_below_0.1"], stats["frac_below_0.3"], stats["frac_below_0.5"]) == (0.25, 0.5, 0.75)
    assert np.isnan(diagnostics.probability_stats(np.array([]))["mean"])


def test_fork_statistics_match_a_plain_forward_at_the_carries():
    cfg = ModelConfig.tiny(vocab_size=TASK.vocab_size, hidden_size=32, num_hidden_layers=2,
                           layer_types=m1_layer_types(2, 2), num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                           rotary_dim=4, intermediate_size=32, num_local_experts=2, block_size=8,
                           max_position_embeddings=TASK.max_prompt_tokens + TASK.max_new_tokens)
    model = init_model(cfg, seed=3)
    graphdef, params = split_model(model)
    problems = TASK.sample(np.random.default_rng(0), 12)
    got = diagnostics.fork_statistics(graphdef, params, TASK, problems)
    at_carry, elsewhere = [], []
    for p in problems:  # every prompt of the task has the same length: no padding to mask
        answer = TOK.encode(p.answer) + [TOK.EOS]
        tokens = np.array([TASK.prompt(p) + answer])
        logits = np.asarray(model(jax.numpy.asarray(tokens)).logits[0], np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        start = len(TASK.prompt(p))
        carries = list(TASK.carry_in(p)) + [False]  # EOS is never a carry position
        for j, token in enumerate(answer):
            (at_carry if carries[j] else elsewhere).append(np.exp(logp[start + j - 1, token]))
    assert got["decision"]["tokens"] == len(at_carry) > 0 and got["other"]["tokens"] == len(elsewhere)
    assert got["decision"]["mean"] == pytest.approx(np.mean(at_carry), rel=1e-4)
    assert got["other"]["mean"] == pytest.approx(np.mean(elsewhere), rel=1e-4)
    assert got["decision"]["frac_below_0.1"] == pytest.approx(np.mean(np.array(at_carry) < 0.1))
    assert got["decisions_per_problem"] == pytest.approx(len(at_carry) / len(problems))
