"""The trainer's two configurations: ``TrainConfig`` (what the optimisation computes: optimizer, schedule, loss) and
``RunConfig`` (the loop around it: data, batch, length, mesh, checkpoint and logging cadence).

Fields marked ``resume=False`` may change when a run is resumed (how long it runs, how it is laid out, how often it
logs, execution-only loss settings); every other field is fixed for the life of a run directory, and a resumed run
that changes one is refused (``m1jax.train.run_dir``).
"""
from __future__ import annotations

import dataclasses

from m1jax.config import Config, ConfigError, setting
from m1jax.losses import IMPLEMENTATIONS as CE_IMPLEMENTATIONS

SCHEDULES = ("cosine", "linear", "constant")
NONFINITE_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Optimizer, schedule and loss settings. Defaults are M1's AdamW (beta1 0.9, beta2 0.95, eps 1e-15; the
    common 0.999 / 1e-8 made M1's RL training fail to converge)."""
    learning_rate: float = setting(3e-4, help="peak learning rate")
    schedule: str = setting("cosine", choices=SCHEDULES,
                            help="after warm-up: cosine or linear decay to final_lr_ratio * lr, or constant")
    warmup_steps: int = setting(0, help="linear warm-up from 0")
    total_steps: int = setting(1000, help="length of warm-up + decay")
    final_lr_ratio: float = setting(0.1, help="final / peak learning rate of the decay")
    b1: float = setting(0.9)
    b2: float = setting(0.95)
    eps: float = setting(1e-15)
    weight_decay: float = setting(0.1, help="AdamW decay of matrices (ndim >= 2); norms' gains are not decayed")
    clip_norm: float | None = setting(1.0, help="global-norm clip of the accumulated gradient (None: off)")
    grad_accum: int = setting(1, resume=False, help="micro-batches per step (the batch is split into this many)")
    ce_chunk_size: int = setting(8192, resume=False,
                                 help="vocabulary columns per chunk of the fused LM head + cross-entropy")
    ce_implementation: str = setting("chunked", choices=CE_IMPLEMENTATIONS, resume=False)

    def validate(self) -> None:
        if self.grad_accum < 1:
            raise ConfigError(f"TrainConfig.grad_accum: must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ConfigError(f"TrainConfig.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.total_steps < 1:
            raise ConfigError(f"TrainConfig.total_steps: must be >= 1, got {self.total_steps}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"TrainConfig.clip_norm: must be > 0, or None for no clipping, got {self.clip_norm}")
        if self.ce_chunk_size < 1:
            raise ConfigError(f"TrainConfig.ce_chunk_size: must be >= 1, got {self.ce_chunk_size}")


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """The training loop's settings: what it reads, how long, on which mesh, and how often it saves and reports."""
    data: str = setting("synthetic:add", help="synthetic:add, synthetic:mul, or a token-file prefix")
    batch: int = setting(8, help="global batch: sequences per step over all processes and micro-batches")
    seq_len: int | None = setting(None, help="tokens per sequence (synthetic default: the task's longest)")
    seed: int = setting(0, help="parameter initialisation and data order")
    steps: int = setting(1000, resume=False, help="stop after this many optimizer steps")
    mesh: str | None = setting(None, resume=False, help="mesh spec, e.g. data=4,expert=2 (default: all on data)")
    fsdp: bool = setting(False, resume=False, help="shard parameters and optimizer state over the data axes too")
    save_every: int = setting(100, resume=False, help="checkpoint every N steps (and at the end and on a signal)")
    keep: int | None = setting(3, resume=False, help="checkpoints kept (None: all)")
    log_every: int = setting(1, resume=False, help="progress line every N steps (metrics are written every step)")
    eval_every: int = setting(0, resume=False, help="held-out loss on eval_data every N steps (0: never)")
    eval_data: str | None = setting(None, resume=False, help="data spec of the held-out loss")
    eval_batches: int = setting(2, resume=False, help="global batches per evaluation")
    init_params: str | None = setting(None, resume=False,
                                      help="start from converted parameters (experiments.convert's params dir)")
    peak_tflops: float | None = setting(None, resume=False,
                                        help="MFU denominator per device (default: the device's datasheet peak)")
    wandb: bool = setting(False, resume=False, help="also log to Weights & Biases when it is installed")
    on_nonfinite: str = setting("stop", choices=NONFINITE_POLICIES, resume=False,
                                help="a step whose loss or gradient norm is NaN or inf: stop the run (nothing of it "
                                     "is saved) or skip its update")

    def validate(self) -> None:
        for name in ("batch", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RunConfig.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"RunConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"RunConfig.seq_len: must be >= 1, got {self.seq_len}")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"RunConfig.keep: must be >= 1 or None, got {self.keep}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"RunConfig.seed: must be in [0, 2**32), got {self.seed}")
        if self.mesh is not None:
            from sharding.mesh import parse_mesh_spec
            try:
                parse_mesh_spec(self.mesh)
            except ValueError as e:
                raise ConfigError(f"RunConfig.mesh: {e}") from None
