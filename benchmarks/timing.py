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


# Seconds of back-to-back calls before the timed batches: long enough to bring the clocks up after a compile's idle
# time, short enough that a power-capped card is still close to idle temperature. On an H200 the Mosaic GPU forward +
# backward at B1 H64 32K timed 2.11 ms 0.3-0.45 s into a run and 2.22 ms 2-4 s into it, as the clock fell from 1.6
# to 1.5 GHz under the 700 W cap; fla's, not held down as far, 7.97 and 8.08 ms (``benchmarks/RESULTS.md``,
# "Burst and sustained"). About 3 s of warm-up times the card in its sustained state.
WARMUP_SECONDS = 0.3


def time_pipelined(fn, *args, warmup_seconds: float = WARMUP_SECONDS) -> float:
    """Median seconds per call of a jitted ``fn``: the host wall time of back-to-back calls (as many as take >= 30 ms,
    at most 200) divided by their number, five times, after ``warmup_seconds`` of such batches (at least one).

    The calls queue on the device, so this is the device's time per call. Every call's outputs stay alive until the
    last one is done: dropping a call's outputs while the device still writes them makes the host wait for that call
    before it can free them, which stalls the queue (measured on an H200: a lightning forward at 32K timed 0.737 ms
    that way against 0.641 ms with the outputs kept; ``benchmarks/RESULTS.md``).
    """
    return pipelined_seconds(lambda: fn(*args), jax.block_until_ready, warmup_seconds=warmup_seconds)


def calls_per_batch(call, wait, batch_seconds: float = 0.03) -> tuple[float, int]:
    """(seconds of one call, calls that take about ``batch_seconds``, at least 1), after one call that compiles and
    warms up; ``call`` and ``wait`` as in ``pipelined_seconds``."""
    wait(call())
    t0 = time.perf_counter()
    wait(call())
    once = max(time.perf_counter() - t0, 1e-6)
    return once, max(1, int(batch_seconds / once))


def pipelined_seconds(call, wait, *, warmup_seconds: float = WARMUP_SECONDS) -> float:
    """``time_pipelined`` for any framework: ``call()`` queues one call on the device and returns its outputs,
    ``wait(outputs)`` blocks until the device has finished them (torch: ``lambda _: torch.cuda.synchronize()``)."""
    if warmup_seconds < 0:
        raise ValueError(f"warmup_seconds must be >= 0; got {warmup_seconds}")
    once, n = calls_per_batch(call, wait)
    n = min(200, n)
    # Warm the clocks up again after the compile's idle time (on an H200 the first implementation timed after a
    # compile ran up to 10% slower than the same kernel timed later), in batches like the timed ones: calls waited on
    # one at a time leave the card idle between them and it does not heat up as it does under a real load.
    start = time.perf_counter()
    while True:
        wait([call() for _ in range(n)])
        if time.perf_counter() - start >= warmup_seconds:
            break
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        outs = [call() for _ in range(n)]
        wait(outs)
        times.append((time.perf_counter() - t0) / n)
        del outs
    return float(np.median(times))


def jit_timed(fwd, with_bwd, output=lambda out: out):
    """The jitted function the benchmark times: ``fwd`` alone, or forward + backward returning (o, (dq, dk, dv)),
    o = ``output(fwd(q, k, v))``.

    The forward's output must be returned with the gradients: the backward only needs q, k, v, so with the gradients
    alone jit drops the whole forward kernel (a custom call with no side effects) and the time is the backward's.
    fla's forward + backward (``o.backward(do)``) always runs its forward.
    """
    if not with_bwd:
        return jax.jit(fwd)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(lambda *a: output(fwd(*a)), q, k, v)
        return o, vjp(do)
    return jax.jit(fwd_bwd)
