"""A toy RL task that has nothing to do with arithmetic, a tiny M1-pattern model for it, and a learner on both.

ParityTask: the prompt names a parity (token 3: even, 4: odd); the reward is 1 when the first response token has that
parity. An untrained model is right about half the time, so most groups are mixed, and RL must learn to read the
prompt. Shared by the learner tests and the multi-process worker (tests/rl/rl_worker.py).
"""
from __future__ import annotations

import numpy as np

from m1jax.config import ModelConfig, m1_layer_types
from m1jax.model import init_model
from m1jax.rl.learner import Learner, RLConfig
from m1jax.rl.rollout import RolloutConfig
from m1jax.rl.step import UpdateConfig
from m1jax.rl.task import Task
from m1jax.train import split_model

PAD, STOP, BOS = 0, 1, 2


class ParityTask(Task):
    pad_id, stop_ids, max_prompt_tokens, max_new_tokens = PAD, (STOP,), 2, 3
    vocab_size = 8

    def sample(self, rng, n):
        return rng.integers(0, 2, n).tolist()

    def prompt(self, problem):
        return [BOS, 3 + problem]

    def reward(self, problem, completion):
        return float(int(completion[0]) % 2 == problem)

    def eval_subsets(self, problems):
        return {"odd": np.asarray(problems) == 1}


def model_config() -> ModelConfig:
    # One lightning and one softmax layer, 4 experts: the M1 pattern at the smallest size; dims divide a 2x4 mesh.
    return ModelConfig.tiny(vocab_size=ParityTask.vocab_size, hidden_size=32, num_hidden_layers=2,
                            layer_types=m1_layer_types(2, 2), num_attention_heads=2, num_key_value_heads=2,
                            head_dim=8, rotary_dim=4, intermediate_size=32, num_local_experts=4, block_size=8,
                            max_position_embeddings=16)


def learner(mesh=None, *, steps: int = 1, loss: str = "cispo", **rl_overrides):
    """(learner, initial params) of the parity task: 4 groups of 4 per update batch, mu = 2, dynamic sampling from
    8 sampled prompts (32 rollout rows: they split over 8 devices)."""
    graphdef, params = split_model(init_model(model_config(), seed=0))
    rl = RLConfig(prompts=4, oversample=2, dynamic_sampling=True, steps=steps, eval_every=max(steps, 1),
                  eval_problems=8, eval_samples=4, seed=3).replace(**rl_overrides)
    update = UpdateConfig(loss=loss, mu=2, learning_rate=1e-2)
    return Learner(graphdef, ParityTask(), config=rl, update=update, rollout=RolloutConfig(group_size=4),
                   mesh=mesh), params
