"""CPU smoke run of the whole RL pipeline: teacher SFT (m1jax.rl.pretrain) of a small M1-pattern model on 1-digit
noisy-carry addition, then CISPO with mu = 4 through the learner; the held-out accuracy must rise.

After SFT the policy writes the carry digit with probability about 1 - forget_prob = 0.4 and so fails most carry
problems (greedy always drops the carry); RL has to flip that fork token. Seeded; about a minute on two cores.
"""
import numpy as np

from m1jax.config import ModelConfig, m1_layer_types
from m1jax.rl.learner import Learner, RLConfig
from m1jax.rl.pretrain import SFTConfig, pretrain
from m1jax.rl.rollout import RolloutConfig
from m1jax.rl.step import UpdateConfig
from m1jax.rl.tasks import ArithmeticTask


def test_cispo_raises_accuracy_on_cpu():
    task = ArithmeticTask(min_digits=1, max_digits=1, forget_prob=0.6)
    cfg = ModelConfig.tiny(vocab_size=task.vocab_size, hidden_size=64, num_hidden_layers=4,
                           layer_types=m1_layer_types(4, 4), num_attention_heads=4, num_key_value_heads=4,
                           head_dim=16, rotary_dim=8, intermediate_size=64, num_local_experts=4, block_size=16,
                           max_position_embeddings=32)
    graphdef, params = pretrain(cfg, task, SFTConfig(steps=250, batch=64, learning_rate=1e-2, seed=0),
                                log=lambda m: None)
    learner = Learner(graphdef, task, config=RLConfig(prompts=16, dynamic_sampling=True, steps=25, eval_every=25,
                                                      eval_problems=32, eval_samples=8, seed=0),
                      update=UpdateConfig(loss="cispo", mu=4, learning_rate=3e-4),
                      rollout=RolloutConfig(group_size=8))
    _, records = learner.run(learner.init_state(params), log=lambda m: None)
    start, end = records[0], records[-1]
    assert start["greedy_acc"] < 0.8, start  # the pretrained policy drops carries
    assert start["greedy_acc_carry"] < start["greedy_acc"], start
    assert end["acc"] > start["acc"] + 0.08, (start, end)
    assert end["greedy_acc"] >= start["greedy_acc"], (start, end)
    # Every step logged the train/infer agreement; on CPU in fp32 the sampler and trainer agree.
    steps = [r for r in records if "mismatch_pearson" in r]
    assert len(steps) == learner.config.steps
    assert min(r["mismatch_pearson"] for r in steps) > 0.9999
    assert np.mean([r["reward_mean"] for r in steps[-5:]]) > np.mean([r["reward_mean"] for r in steps[:5]])
