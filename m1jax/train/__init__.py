"""Training: configs (``config``), optimizer and schedules, the train state and its placement, the LM loss, the
jitted step, FLOP counts, preemption, evaluation hooks, run-directory rules and the ``Trainer`` loop."""
from m1jax.train.config import SCHEDULES, RunConfig, TrainConfig
from m1jax.train.evaluation import make_loss_evaluator
from m1jax.train.flops import peak_hbm_tbps, peak_tflops, train_flops_per_token
from m1jax.train.loop import Trainer
from m1jax.train.loss import head_kernel, lm_loss
from m1jax.train.optimizer import make_optimizer, make_schedule
from m1jax.train.preemption import PreemptionGuard
from m1jax.train.run_dir import ResumeConflict, check_start, resolve_configs
from m1jax.train.state import (TrainState, abstract_train_state, create_train_state, init_train_state,
                               split_model, train_state_shardings)
from m1jax.train.step import batch_shardings, host_metrics, make_train_step, train_step

__all__ = ["PreemptionGuard", "ResumeConflict", "RunConfig", "SCHEDULES", "TrainConfig", "TrainState", "Trainer",
           "abstract_train_state", "batch_shardings", "check_start", "create_train_state",
           "head_kernel", "host_metrics", "init_train_state", "lm_loss", "make_loss_evaluator", "make_optimizer",
           "make_schedule", "make_train_step", "peak_hbm_tbps", "peak_tflops", "resolve_configs", "split_model",
           "train_flops_per_token", "train_state_shardings", "train_step"]
