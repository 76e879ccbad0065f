"""RL tasks: implementations of the learner's task interface (``m1jax.rl.task.Task``).

``arithmetic``: noisy-carry addition and K-digit x 1-digit multiplication with an imperfect teacher for pretraining.
"""
from m1jax.rl.tasks.arithmetic import (ArithmeticTask, CharTokenizer, Problem, batch_rewards, encode_prompts,
                                       pad_sequences, teacher_sft_batch)

__all__ = ["ArithmeticTask", "CharTokenizer", "Problem", "batch_rewards", "encode_prompts", "pad_sequences",
           "teacher_sft_batch"]
