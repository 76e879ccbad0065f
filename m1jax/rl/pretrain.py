"""Supervised pretraining on a task's data (its ``sft_batch``): the starting policy of an RL run.

For the CISPO reproduction the data come from an imperfect teacher (``m1jax.rl.tasks.arithmetic``), so the
pretrained policy puts a minority of its probability on the correct token at the decisive ("fork") positions, and RL
has to flip them. The step is the library's training step (``m1jax.train``): next-token cross-entropy on the target
tokens, AdamW with a short warm-up then cosine decay.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from m1jax.config import Config, ConfigError, ModelConfig, setting
from m1jax.rl.placement import Placement
from m1jax.rl.task import Task
from m1jax.train import TrainConfig, create_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class SFTConfig(Config):
    """Pretraining on the task: ``steps`` AdamW steps of ``batch`` sequences, peak ``learning_rate`` (cosine to 10%
    after a warm-up of 5% of the steps)."""
    steps: int = setting(250, help="pretraining steps")
    batch: int = setting(64, help="sequences per step")
    learning_rate: float = setting(1e-2, help="peak learning rate")
    weight_decay: float = 0.01
    seed: int = setting(0, help="seed of the initial parameters and the data")

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ConfigError(f"SFTConfig: steps and batch must be >= 1, got {self.steps}, {self.batch}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(learning_rate=self.learning_rate, schedule="cosine", warmup_steps=max(1, self.steps // 20),
                           total_steps=self.steps, final_lr_ratio=0.1, eps=1e-8, weight_decay=self.weight_decay)


def pretrain(model: ModelConfig, task: Task, sft: SFTConfig, *, mesh: jax.sharding.Mesh | None = None, log=print):
    """A fresh model (seed ``sft.seed``) trained on ``task.sft_batch``. Returns (graphdef, params), on ``mesh`` when
    given (every process draws the same batches and supplies the rows its devices hold)."""
    tc = sft.train_config()
    place = Placement(mesh)
    graphdef, state = create_train_state(model, tc, seed=sft.seed, mesh=mesh)
    if mesh is None:
        train_step = make_train_step(graphdef, tc)
    else:
        state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
        tokens, _ = task.sft_batch(np.random.default_rng(0), sft.batch)
        shape = (sft.batch, tokens.shape[1] - 1)
        train_step = make_train_step(graphdef, tc, state_shardings,
                                     {k: place.row_sharding(shape) for k in _BATCH_KEYS})
    rng = np.random.default_rng(sft.seed + 1000)
    t0 = time.perf_counter()
    for i in range(sft.steps):
        batch = {k: place.rows(v) for k, v in next_token_batch(*task.sft_batch(rng, sft.batch)).items()}
        with place.context():
            state, metrics = train_step(state, batch)
        if i % max(1, sft.steps // 10) == 0 or i == sft.steps - 1:
            log(f"[sft] step {i:5d}  loss {float(metrics['loss']):.4f}  ({time.perf_counter() - t0:.0f}s)")
    return graphdef, state.params


_BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def next_token_batch(tokens: np.ndarray, target_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Sequences [B, L] and their target mask -> the training step's batch of [B, L - 1] arrays (inputs predict the
    next token; the loss counts the positions whose next token is a target)."""
    b, length = tokens.shape[0], tokens.shape[1] - 1
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": target_mask[:, 1:].astype(np.float32),
            "segment_ids": np.ones((b, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}
