"""Host wall-clock timing of jitted JAX calls for the benchmarks (experiments/bench_moe.py, bench_train.py).

Each call is followed by ``block_until_ready``; every measurement starts with two warm-up calls (which also compile).
No environment side effects, so any benchmark can import it.
"""
from __future__ import annotations

import time

import jax
import numpy as np


def wall_ms(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def timing_stats(times) -> tuple[float, float, float]:
    return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def time_ms(fn, *args, reps: int) -> tuple[float, float, float]:
    """Median, p20, p80 of host wall time in ms (after two warm-up calls that also compile)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    return timing_stats([wall_ms(fn, *args) for _ in range(reps)])


def time_round_robin(fns: dict, args, reps: dict) -> dict:
    """name -> (median, p20, p80) ms, or the exception it raised; one call of each fn per round.

    Interleaved because the card's clock depends on what ran just before: on the H100 (2026-11-26) the same
    kernel timed 5.5 ms after itself and 6.6 ms right after the dense matmul. Rounds spread that over all.
    """
    results, times = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(2):
                jax.block_until_ready(fn(*args))
            times[name] = []
        except Exception as e:  # noqa: BLE001  (e.g. ragged_dot's dense rewrite running out of memory)
            results[name] = e
    for round_ in range(max(reps.values(), default=0)):
        for name in times:
            if round_ < reps[name]:
                times[name].append(wall_ms(fns[name], *args))
    results.update({name: timing_stats(t) for name, t in times.items()})
    return results
