"""What the RL learner needs from a task: problems, their prompts as token ids, and a verifier.

The learner (``m1jax.rl.learner``) knows nothing else about a task. A task is any object with the members of
``Task``; deriving from it gives the optional members their defaults. ``m1jax.rl.tasks`` holds the implementations
(the noisy-carry arithmetic of the CISPO reproduction, ``m1jax.rl.tasks.arithmetic``).

Problems are opaque Python objects: the learner only passes them back to ``prompt`` and ``reward``. All of it is host
code (numpy/python), deterministic given the ``numpy.random.Generator`` that ``sample`` receives; in a multi-process
run every process calls ``sample`` with the same generator state, so all processes agree on the problems, and each
process calls ``reward`` only for the rollout rows that its devices hold.
"""
from __future__ import annotations

import abc
from typing import Any, Mapping, Sequence

import numpy as np


class Task(abc.ABC):
    """The task interface. Required: the four token constants and ``sample``/``prompt``/``reward``.

    pad_id:            token id that pads prompts (on the left) and responses (after their end)
    stop_ids:          token ids that end a response (EOS); the stop token belongs to the response
    max_prompt_tokens: P, the longest ``prompt(problem)``; every prompt is left-padded to it
    max_new_tokens:    N, the longest response the rollout samples (a row without a stop token is cut there)
    """

    pad_id: int
    stop_ids: tuple[int, ...]
    max_prompt_tokens: int
    max_new_tokens: int

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> Sequence[Any]:
        """n problems, drawn with ``rng`` only."""

    @abc.abstractmethod
    def prompt(self, problem) -> Sequence[int]:
        """The prompt's token ids (BOS included if the task uses one), at most ``max_prompt_tokens`` of them."""

    @abc.abstractmethod
    def reward(self, problem, completion: np.ndarray) -> float:
        """The verifier: reward of one completion, token ids [N] int32 sampled after the prompt (the stop token
        included, then ``pad_id`` up to N; a completion with no stop token was cut at N)."""

    def eval_subsets(self, problems: Sequence[Any]) -> Mapping[str, np.ndarray]:
        """Named subsets of held-out problems to report accuracy on, besides all of them: name -> [n] bool.
        The learner's evaluation reports ``acc_<name>`` and ``greedy_acc_<name>`` for each. Default: none."""
        return {}

    def decision_mask(self, problem, completion: np.ndarray) -> np.ndarray | None:
        """The completion's decision points: bool [N] over ``completion`` ([N] int32, as ``reward`` gets it), True
        at the tokens whose choice decides the reward (the "fork" tokens of M1's argument, e.g. the digits that
        receive a carry), False elsewhere and after the response's end. The learner reports how the update treats
        them (clip fractions and gradient share at decision points). Default None: the task marks none."""
        return None

    def reference_completion(self, problem) -> Sequence[int] | None:
        """A correct completion's token ids (stop token included), for diagnostics that teacher-force it (the
        probability of the correct token at each decision point). Default None: the task gives none."""
        return None

    def sft_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Supervised sequences for pretraining on the task (``m1jax.rl.pretrain``): (tokens [n, L] int32 right-
        padded, target_mask [n, L] bool marking the tokens to predict). Only tasks used for pretraining need it."""
        raise NotImplementedError(f"{type(self).__name__} has no supervised data (sft_batch)")


def encode_prompts(task: Task, problems: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to ``task.max_prompt_tokens``: (tokens [n, P] int32, start [n] int32 first valid slot)."""
    length = task.max_prompt_tokens
    tokens = np.full((len(problems), length), task.pad_id, np.int32)
    start = np.zeros(len(problems), np.int32)
    for i, problem in enumerate(problems):
        ids = list(task.prompt(problem))
        if not 0 < len(ids) <= length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the task's max_prompt_tokens is {length}")
        start[i] = length - len(ids)
        tokens[i, start[i]:] = ids
    return tokens, start


def decision_masks(task: Task, problems: Sequence[Any], completions: np.ndarray) -> np.ndarray | None:
    """Decision points [n, N] bool of completions [n, N] (row i answers problems[i]); None when the task marks none
    (no ``decision_mask`` member, or it returns None)."""
    method = getattr(task, "decision_mask", None)
    if method is None:
        return None
    completions = np.asarray(completions)
    out = np.zeros(completions.shape, bool)
    for i, (problem, completion) in enumerate(zip(problems, completions)):
        row = method(problem, completion)
        if row is None:
            return None
        row = np.asarray(row, bool)
        if row.shape != completion.shape:
            raise ValueError(f"decision_mask gave shape {row.shape} for a completion of shape {completion.shape}")
        out[i] = row
    return out


def score_completions(task: Task, problems: Sequence[Any], completions: np.ndarray) -> np.ndarray:
    """Rewards [n] float32 of completions [n, N] (row i answers problems[i])."""
    completions = np.asarray(completions)
    if completions.ndim != 2 or completions.shape[0] != len(problems):
        raise ValueError(f"completions must be [{len(problems)}, N], got shape {completions.shape}")
    return np.array([task.reward(p, c) for p, c in zip(problems, completions)], np.float32)
