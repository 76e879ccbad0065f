"""Batches from row sources: a process reads only the global rows its devices hold, and the state is per row.

``BatchLoader(source, global_batch, rows)`` stacks the examples of the given global rows (default: all) into numpy
``[len(rows), T]`` arrays. ``ShardedBatchLoader(source, global_batch, sharding)`` reads this process's rows
(``sharding.multihost.local_rows``) and returns global ``jax.Array`` batches laid out by ``sharding``
(``sharding.multihost.global_array``), so no process ever materialises another process's rows.

State (``state()`` / ``restore(states)``): ``{"seed", "global_batch", "rows": {"<global row>": grain iterator state}}``.
Each process saves the rows it reads; ``restore`` accepts the states of every process that saved, merges their rows
and takes the ones it reads now, so a run can resume on a different number of processes.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from m1jax.data.batch import BATCH_KEYS, DataError
from m1jax.data.packing import PackedTokenSource
from m1jax.data.synthetic import arithmetic_source
from sharding.multihost import global_array, local_rows

SYNTHETIC_PREFIX = "synthetic:"


def make_source(spec: str, seq_len: int | None, seed: int = 0, max_position: int | None = None):
    """``synthetic:add`` / ``synthetic:mul`` (arithmetic tasks) or a token-file prefix -> a row source.

    ``max_position``: the model's ``max_position_embeddings``, which the rows' positions must fit.
    """
    if spec.startswith(SYNTHETIC_PREFIX):
        return arithmetic_source(spec[len(SYNTHETIC_PREFIX):], seq_len, seed, max_position)
    if seq_len is None:
        raise DataError(f"data {spec!r} is a token file: it needs a sequence length (run.seq_len, --seq_len)")
    if not os.path.exists(os.fspath(spec) + ".json"):
        raise DataError(f"data {spec!r} is neither synthetic:add, synthetic:mul nor a token file prefix "
                        f"(no {spec}.json)")
    return PackedTokenSource(spec, seq_len, seed, max_position=max_position)


class BatchLoader:
    """Numpy batches of the global rows ``rows`` (default: all ``global_batch``) of every step (see the module)."""

    def __init__(self, source, global_batch: int, rows: Sequence[int] | None = None):
        if global_batch < 1:
            raise DataError(f"global batch must be >= 1, got {global_batch}")
        self.source, self.global_batch = source, global_batch
        self.rows = tuple(int(r) for r in (range(global_batch) if rows is None else rows))
        if not self.rows:
            raise DataError("a loader needs at least one row")
        self._iterators = [source.row_iterator(r, global_batch) for r in self.rows]

    @property
    def seq_len(self) -> int:
        return self.source.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        examples = [next(it) for it in self._iterators]
        return {k: np.stack([e[k] for e in examples]) for k in BATCH_KEYS}

    def state(self) -> dict:
        return {"seed": self.source.seed, "global_batch": self.global_batch,
                "rows": {str(r): it.get_state() for r, it in zip(self.rows, self._iterators)}}

    def restore(self, states: Mapping | Sequence[Mapping]) -> None:
        """Continue from ``state()`` results: one, or one per process that saved (their rows are merged)."""
        states = [states] if isinstance(states, Mapping) else list(states)
        rows: dict[str, dict] = {}
        for state in states:
            if state.get("seed") != self.source.seed:
                raise DataError(f"data state has seed {state.get('seed')}, this loader {self.source.seed}")
            if state.get("global_batch") != self.global_batch:
                raise DataError(f"data state is for a global batch of {state.get('global_batch')} rows, this "
                                f"loader reads {self.global_batch}")
            rows.update(state["rows"])
        missing = [r for r in self.rows if str(r) not in rows]
        if missing:
            raise DataError(f"data state lacks rows {missing[:8]} (saved rows: {len(rows)} of {self.global_batch})")
        for r, it in zip(self.rows, self._iterators):
            it.set_state(rows[str(r)])


class ShardedBatchLoader:
    """Global ``jax.Array`` batches ``[global_batch, T]`` laid out by ``sharding``, built from this process's rows."""

    def __init__(self, source, global_batch: int, sharding):
        self.sharding = sharding
        self.shape = (global_batch, source.seq_len)
        self.host = BatchLoader(source, global_batch, local_rows(sharding, self.shape))

    @property
    def seq_len(self) -> int:
        return self.host.seq_len

    @property
    def rows(self) -> tuple[int, ...]:
        return self.host.rows

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: global_array(v, self.sharding, self.shape) for k, v in next(self.host).items()}

    def state(self) -> dict:
        return self.host.state()

    def restore(self, states: Mapping | Sequence[Mapping]) -> None:
        self.host.restore(states)
