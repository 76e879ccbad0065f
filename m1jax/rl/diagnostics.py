"""Checks of a policy before RL: accuracy, the fork-token statistics, and the sampler/trainer head mismatch.

``policy_diagnostics`` answers "is this a good starting point for the CISPO-vs-DAPO test?": the sampled and greedy
accuracy on held-out problems, the fraction of groups of G samples that would be mixed (the ones that carry an
advantage), and, teacher-forcing each problem's correct completion (``Task.reference_completion``), the probability
the policy gives the correct token at the task's decision points (``Task.decision_mask``) against every other
token. M1's argument needs decision tokens that are rare under the policy (P(correct) well below 0.5), the rest
nearly certain.

``head_mismatch`` measures M1's train/infer probability mismatch (sampler vs trainer token probabilities) with an
fp32 and a compute-dtype LM head, optionally with the head scaled up (large logits, as M1's high-magnitude head).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.rl.rollout import RolloutConfig, repeat_rows, sample
from m1jax.rl.step import pearson, response_logprobs
from m1jax.rl.task import Task, decision_masks, encode_prompts, score_completions

THRESHOLDS = (0.1, 0.3, 0.5)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def probability_stats(prob: np.ndarray, thresholds=THRESHOLDS) -> dict[str, float]:
    """Summary of probabilities [n]: count, mean, quantiles ``q<percent>`` and ``frac_below_<t>`` for each
    threshold t (NaN when empty)."""
    prob = np.asarray(prob, np.float64).reshape(-1)
    out = {"tokens": int(prob.size)}
    if not prob.size:
        return {**out, "mean": float("nan"), **{f"q{int(q * 100)}": float("nan") for q in QUANTILES},
                **{f"frac_below_{t}": float("nan") for t in thresholds}}
    out["mean"] = float(prob.mean())
    out.update({f"q{int(q * 100)}": float(np.quantile(prob, q)) for q in QUANTILES})
    out.update({f"frac_below_{t}": float(np.mean(prob < t)) for t in thresholds})
    return out


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames="fp32_head")
def _logprobs(graphdef, params, tokens, start, num_new, *, fp32_head):
    return response_logprobs(graphdef, params, tokens, start, num_new, fp32_head=fp32_head)


def reference_logprobs(graphdef, params, task: Task, problems: Sequence[Any], *, fp32_head: bool = True,
                       chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Teacher-forced reference completions: (log-prob of each reference token [n, N] float32, token mask [n, N]
    bool, decision points [n, N] bool or None). Rows go through the trainer forward ``chunk`` at a time (the last
    chunk padded, so one program serves every chunk)."""
    n_new = task.max_new_tokens
    completions = np.full((len(problems), n_new), task.pad_id, np.int32)
    mask = np.zeros(completions.shape, bool)
    for i, problem in enumerate(problems):
        ids = task.reference_completion(problem)
        if ids is None:
            raise ValueError(f"{type(task).__name__} gives no reference_completion; fork statistics need one")
        if not 0 < len(ids) <= n_new:
            raise ValueError(f"reference completion {i} has {len(ids)} tokens; max_new_tokens is {n_new}")
        completions[i, :len(ids)], mask[i, :len(ids)] = ids, True
    prompts, start = encode_prompts(task, problems)
    tokens = np.concatenate([prompts, completions], axis=1)
    logp = np.zeros(completions.shape, np.float32)
    for lo in range(0, len(problems), chunk):
        rows = np.arange(lo, lo + chunk) % len(problems)  # wrap the last chunk (its extra rows are discarded)
        out = _logprobs(graphdef, params, jnp.asarray(tokens[rows]), jnp.asarray(start[rows]), n_new,
                        fp32_head=fp32_head)
        take = min(chunk, len(problems) - lo)
        logp[lo:lo + take] = np.asarray(out)[:take]
    return logp, mask, decision_masks(task, problems, completions)


def fork_statistics(graphdef, params, task: Task, problems: Sequence[Any], *, fp32_head: bool = True,
                    thresholds=THRESHOLDS) -> dict:
    """P(correct token) of the policy on the problems' reference completions, teacher-forced: ``decision`` (at the
    task's decision points) and ``other`` (every other reference token), each a ``probability_stats`` dict, plus
    ``decisions_per_problem``."""
    logp, mask, decision = reference_logprobs(graphdef, params, task, problems, fp32_head=fp32_head)
    if decision is None:
        raise ValueError(f"{type(task).__name__} marks no decision points (decision_mask)")
    prob = np.exp(logp)
    return {"decision": probability_stats(prob[mask & decision], thresholds),
            "other": probability_stats(prob[mask & ~decision], thresholds),
            "decisions_per_problem": float((mask & decision).sum() / max(len(problems), 1))}


def sampled_accuracy(graphdef, params, task: Task, problems: Sequence[Any], key, *, samples: int,
                     temperature: float, rollout: RolloutConfig | None = None) -> np.ndarray:
    """Per-problem mean reward [n] of ``samples`` responses at ``temperature`` (0: greedy) on one device."""
    rcfg = rollout or RolloutConfig()
    tokens, start = repeat_rows(*encode_prompts(task, problems), samples)
    out = sample(graphdef, params, jnp.asarray(tokens), jnp.asarray(start), key, rcfg, pad_id=task.pad_id,
                 stop_ids=task.stop_ids, max_new_tokens=task.max_new_tokens, temperature=temperature)
    rewards = score_completions(task, [p for p in problems for _ in range(samples)], np.asarray(out.responses))
    return rewards.reshape(len(problems), samples).mean(axis=1)


def policy_diagnostics(graphdef, params, task: Task, *, problems: int = 512, samples: int = 16, seed: int = 0,
                       group_sizes: Sequence[int] = (8, 16), rollout: RolloutConfig | None = None,
                       fp32_head: bool = True) -> dict:
    """The starting policy on ``problems`` held-out problems (drawn with seed ``seed``):

      acc, greedy_acc               mean reward of ``samples`` samples at temperature 1 / of the greedy answer
      acc_<subset>, greedy_acc_<subset>   the same over each of the task's ``eval_subsets``
      mixed_frac_G<g>               expected fraction of groups of g samples whose rewards are not all equal
                                    (1 - a^g - (1 - a)^g per problem, a its sampled accuracy)
      forks                         ``fork_statistics`` (when the task has reference completions and decisions)
    """
    held_out = list(task.sample(np.random.default_rng([seed, 1]), problems))
    key = jax.random.key(seed)
    acc = sampled_accuracy(graphdef, params, task, held_out, key, samples=samples, temperature=1.0, rollout=rollout)
    greedy = sampled_accuracy(graphdef, params, task, held_out, key, samples=1, temperature=0.0, rollout=rollout)
    out = {"problems": problems, "samples": samples, "acc": float(acc.mean()), "greedy_acc": float(greedy.mean())}
    for name, subset in task.eval_subsets(held_out).items():
        subset = np.asarray(subset, bool)
        out[f"acc_{name}"] = float(acc[subset].mean()) if subset.any() else float("nan")
        out[f"greedy_acc_{name}"] = float(greedy[subset].mean()) if subset.any() else float("nan")
    for g in group_sizes:
        out[f"mixed_frac_G{g}"] = float(np.mean(1.0 - acc ** g - (1.0 - acc) ** g))
    if getattr(task, "reference_completion", None) is not None and task.reference_completion(held_out[0]) is not None:
        out["forks"] = fork_statistics(graphdef, params, task, held_out, fp32_head=fp32_head)
    return out


def head_mismatch(graphdef_for, params, task: Task, problems: Sequence[Any], rollout: RolloutConfig, key, *,
                  heads: Sequence[tuple[str, bool]], head_scales: Sequence[float] = (1.0, 4.0)) -> list[dict]:
    """Sampler vs trainer token-probability Pearson r and max |delta logp| on one rollout of ``problems``.

    heads: (label, fp32) pairs; ``graphdef_for(fp32)`` gives the model with that head precision (both sides alike).
    Each head kernel is also scaled by each of ``head_scales`` (larger logits, mimicking M1's high-magnitude head).
    """
    tokens, start = repeat_rows(*encode_prompts(task, problems), rollout.group_size)
    out = []
    for label, fp32 in heads:
        graphdef = graphdef_for(fp32)
        for scale in head_scales:
            scaled = jax.tree_util.tree_map_with_path(
                lambda path, x, scale=scale: x * scale if "lm_head" in jax.tree_util.keystr(path) else x, params)
            s = sample(graphdef, scaled, jnp.asarray(tokens), jnp.asarray(start), key, rollout, pad_id=task.pad_id,
                       stop_ids=task.stop_ids, max_new_tokens=task.max_new_tokens)
            trainer = _logprobs(graphdef, scaled, s.tokens, s.start, s.responses.shape[1], fp32_head=fp32)
            mask = s.response_mask
            out.append({"head": label, "head_scale": scale,
                        "pearson": float(pearson(jnp.exp(s.sampler_logp), jnp.exp(trainer), mask)),
                        "max_abs_logp_diff": float(jnp.max(jnp.abs(trainer - s.sampler_logp) * mask)),
                        "tokens": int(mask.sum())})
    return out
