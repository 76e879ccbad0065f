"""RL rollout: G samples per prompt from the generation engine, host-side rewards, advantages and dynamic sampling.

Phase 1 and 2 of spec/rl-cispo.md section 6. ``sample_groups`` runs the jitted prefill + ``lax.while_loop`` decode of
``m1jax.generate`` (temperature 1, the cache donated) and records the sampler's fp32 log-probs of the raw model
distribution (the M1 FP32 head when ``cfg.lm_head_fp32``); ``score_groups`` computes rewards with the task's verifier,
group advantages and (optionally) DAPO's dynamic sampling, and lays the result out as one static-shape ``UpdateBatch``
for ``m1jax.rl.step``.

Layout: prompts are left-padded to a fixed length P (``encode_prompts``), so a row of the update batch is
``tokens [P + N] = prompt (left-padded) ++ response (right-padded)`` with N = max_new_tokens; ``start`` is the first
valid slot of the row (the slots before it are padding, excluded by segment ids in the trainer forward and by the
cache's ``start`` in the sampler). The G responses of one prompt are adjacent rows.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import generate
from m1jax.cache import HybridCache
from m1jax.rl.advantages import group_advantages, select_mixed_groups
from m1jax.rl.tasks import ArithmeticTask, CharTokenizer, batch_rewards, encode_prompts


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings of one RL rollout.

    truncate_after / truncate_prob: M1's early truncation (stop a row after that many consecutive sampled tokens each
    of probability > truncate_prob; M1 used 3000 and 0.99; <= 0 disables it).
    """
    group_size: int = 16
    max_new_tokens: int = 10
    temperature: float = 1.0
    truncate_after: int = 3000
    truncate_prob: float = 0.99
    chunk_size: int = 512
    kv_dtype: str | None = None  # None: the model's compute dtype


@dataclasses.dataclass(frozen=True)
class Samples:
    """Host copies of a rollout of R = num_prompts * G rows (numpy).

    tokens [R, P + N] int32 (prompt left-padded ++ response, PAD after each response's end); start [R] int32;
    sampler_logp [R, N] float32 log-prob of each response token under the sampler (0 past the end); max_probs [R, N];
    lengths [R] int32 (EOS counted); stop_reason [R] int32 (generate.MAX_LENGTH / STOP_TOKEN / TRUNCATED).
    """
    tokens: np.ndarray
    start: np.ndarray
    sampler_logp: np.ndarray
    max_probs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.sampler_logp.shape[1]

    @property
    def responses(self) -> np.ndarray:
        """[R, N] the sampled response tokens."""
        return self.tokens[:, self.prompt_length:]

    @property
    def response_mask(self) -> np.ndarray:
        """[R, N] float32: 1 on generated tokens (EOS included), 0 after."""
        n = self.sampler_logp.shape[1]
        return (np.arange(n)[None, :] < self.lengths[:, None]).astype(np.float32)


def sample_groups(graphdef, params, prompt_tokens, start, key, rcfg: RolloutConfig, stop_tokens=(CharTokenizer.EOS,)
                  ) -> Samples:
    """Sample G = rcfg.group_size responses for each of n left-padded prompts.

    Args:
      graphdef, params: the split model (``nnx.split``; params are traced, so new params never recompile).
      prompt_tokens: [n, P] int32 left-padded prompts; start: [n] int32 first valid slot (P - prompt length).
      key: a jax PRNG key.
    Returns Samples with R = n * G rows, the G samples of prompt i at rows i*G .. i*G + G - 1.
    """
    g, n_new = rcfg.group_size, rcfg.max_new_tokens
    tokens = np.repeat(np.asarray(prompt_tokens, np.int32), g, axis=0)
    start = np.repeat(np.asarray(start, np.int32), g, axis=0)
    cfg = generate.graphdef_config(graphdef, params)
    p = tokens.shape[1]
    cache = HybridCache.init(cfg, tokens.shape[0], p + n_new, kv_dtype=rcfg.kv_dtype or cfg.compute_dtype,
                             start=jnp.asarray(start))
    # One chunk holds the whole (short) prompt: a single prefill shape per prompt length.
    logits, cache = generate.prefill(graphdef, params, tokens, cache, max(rcfg.chunk_size, p))
    out = generate.decode(graphdef, params, logits, cache, key, max_new_tokens=n_new,
                          sampling=generate.Sampling.make(temperature=rcfg.temperature),
                          stop=generate.StopRules.make(stop_tokens, rcfg.truncate_after, rcfg.truncate_prob),
                          pad_id=CharTokenizer.PAD)
    # The sampler's log-probs: of the sampling distribution when the temperature is 1 (it equals the raw model's
    # there); the raw model's otherwise, since the policy being trained is the temperature-1 model.
    responses, logp, max_probs, lengths, reason = jax.device_get(
        (out.tokens, out.model_logprobs, out.max_probs, out.lengths, out.stop_reason))
    return Samples(tokens=np.concatenate([tokens, responses.astype(np.int32)], axis=1), start=start,
                   sampler_logp=logp.astype(np.float32), max_probs=max_probs.astype(np.float32),
                   lengths=lengths.astype(np.int32), stop_reason=reason.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """The static-shape input of one RL update (numpy, B rows = num_groups * G; see ``m1jax.rl.step``).

    tokens [B, P + N] int32; start [B] int32; mask [B, N] float32 (response tokens x the group's dynamic-sampling
    weight); sampler_logp [B, N] float32; advantages [B] float32; group_ids [B] int32; rewards [B] float32 (for
    logging; padding rows included).
    """
    tokens: np.ndarray
    start: np.ndarray
    mask: np.ndarray
    sampler_logp: np.ndarray
    advantages: np.ndarray
    group_ids: np.ndarray
    rewards: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the jitted update takes (rewards are host-side only)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rewards"}


def score_groups(samples: Samples, problems, task: ArithmeticTask, tokenizer: CharTokenizer, *, group_size: int,
                 num_groups: int, adv_norm: str = "group_std", dynamic_sampling: bool = False, minibatches: int = 1):
    """Rewards, advantages and (optionally) dynamic sampling for a rollout of N >= num_groups groups.

    Args:
      samples: a rollout of N * G rows; problems: the N problems (one per group).
      num_groups: P, the static number of groups in the update batch.
      dynamic_sampling: DAPO's filter: keep the first P groups whose rewards are not all equal, padding with
        zero-weight rows (``select_mixed_groups``); otherwise the first P groups, zero-variance ones included.
      minibatches: mu of the update that takes the batch: the kept groups are spread over its mu row blocks.
    Returns (UpdateBatch of P * G rows, stats dict: reward_mean over all N groups, mixed_frac, kept_groups,
    truncated_frac, mean_length).
    """
    g = group_size
    n = len(problems)
    if samples.tokens.shape[0] != n * g or n < num_groups:
        raise ValueError(f"expected >= {num_groups} groups of {g} rows; got {len(problems)} problems and "
                         f"{samples.tokens.shape[0]} rows")
    rewards = batch_rewards(task, [p for p in problems for _ in range(g)], samples.responses, tokenizer)
    grouped = rewards.reshape(n, g)
    mixed = grouped.max(axis=1) > grouped.min(axis=1)
    if dynamic_sampling:
        index, weight = select_mixed_groups(grouped, num_groups, blocks=minibatches)
    else:
        index, weight = np.arange(num_groups), np.ones(num_groups, np.float32)
    rows = (index[:, None] * g + np.arange(g)[None, :]).reshape(-1)
    kept = grouped[index]
    advantages = np.asarray(group_advantages(kept, norm=adv_norm)).reshape(-1)
    row_weight = np.repeat(weight, g)
    batch = UpdateBatch(tokens=samples.tokens[rows], start=samples.start[rows],
                        mask=samples.response_mask[rows] * row_weight[:, None],
                        sampler_logp=samples.sampler_logp[rows], advantages=advantages.astype(np.float32),
                        group_ids=np.repeat(np.arange(num_groups, dtype=np.int32), g), rewards=kept.reshape(-1))
    stats = {"reward_mean": float(rewards.mean()), "mixed_frac": float(mixed.mean()),
             "kept_groups": float(weight.sum()),
             "truncated_frac": float(np.mean(samples.stop_reason == generate.TRUNCATED)),
             "mean_length": float(samples.lengths.mean())}
    return batch, stats


def prompt_batch(task: ArithmeticTask, tokenizer: CharTokenizer, rng: np.random.Generator, n: int):
    """n fresh problems and their prompts left-padded to task.max_prompt_tokens: (problems, tokens [n, P], start [n])."""
    problems = task.sample(rng, n)
    tokens, lengths = encode_prompts(problems, tokenizer, task.max_prompt_tokens)
    return problems, tokens, (task.max_prompt_tokens - lengths).astype(np.int32)
