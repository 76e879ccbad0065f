"""RL tasks: implementations of the learner's task interface (``m1jax.rl.task.Task``).

``arithmetic``: noisy-carry addition and K-digit x 1-digit multiplication with an imperfect teacher for pretraining.
``column_addition``: noisy-carry addition of aligned operands with K spread over a range, and decision points (the
carry positions): the harder task of the second CISPO reproduction.
"""
from m1jax.rl.tasks.arithmetic import (ArithmeticTask, CharTokenizer, Problem, answer_reward, batch_rewards,
                                       encode_prompts, pad_sequences, teacher_sft_batch)
from m1jax.rl.tasks.column_addition import ColumnAdditionTask, ColumnSum

__all__ = ["ArithmeticTask", "CharTokenizer", "ColumnAdditionTask", "ColumnSum", "Problem", "answer_reward",
           "batch_rewards", "encode_prompts", "pad_sequences", "teacher_sft_batch"]
