"""Energy per call and the clocks a call runs at, from NVML (``pynvml``, the ``nvidia-ml-py`` package).

Why: on an H200 the lightning kernels run against the card's power limit. Every sample of the Mosaic GPU forward and
forward + backward at B1 H64 32K-128K had the software power cap active, at about 690 W and SM clocks of 1.6-1.7 GHz
instead of 1.98 (``benchmarks/RESULTS.md``, "Under the card's power cap"). A kernel there is as fast as its energy per
call allows, and its time alone does not say whether a change saved work or only moved it. ``energy_per_call``
gives both numbers for one call.

Used by ``benchmarks.lightning --energy``.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from benchmarks.timing import calls_per_batch

# NVML clock event reasons that mean "held down by power": the software power cap and the hardware power brake.
POWER_REASONS = 0x4 | 0x80


def nvml_handle(index: int = 0) -> tuple[Any, Any] | None:
    """(the ``pynvml`` module, the handle of GPU ``index``), or None where NVML or an NVIDIA GPU is missing."""
    try:
        import pynvml  # noqa: PLC0415
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001  (no package, no driver, no device: each raises its own type)
        return None


def energy_per_call(call: Callable[[], Any], wait: Callable[[Any], Any], *, seconds: float = 2.0,
                    settle: float = 0.5, sample_every: float = 0.05, nvml: tuple[Any, Any] | None = None) -> dict:
    """Energy and clocks of ``call()`` run back to back for ``seconds``, after ``settle`` seconds of the same.

    ``call()`` queues one call and returns its outputs, ``wait(outputs)`` blocks until they are done (as
    ``benchmarks.timing.pipelined_seconds``). The calls go in batches of about 30 ms, each batch's outputs kept until it
    is done. ``nvml``: ``nvml_handle()``'s pair (default: GPU 0's).

    Returns ``ms`` (wall time per call), ``mJ_per_call`` (NVML's energy counter over the run / calls), ``W`` (mean
    power), ``sm_mhz_median`` and ``sm_mhz_min`` (the SM clock sampled every ``sample_every`` s), ``power_capped``
    (the fraction of samples with a power reason for lower clocks, ``POWER_REASONS``) and ``calls``.
    Raises RuntimeError where NVML has no GPU to read.
    """
    nvml = nvml or nvml_handle()
    if nvml is None:
        raise RuntimeError("energy_per_call needs NVML (pip install nvidia-ml-py) and an NVIDIA GPU")
    lib, handle = nvml
    _, batch = calls_per_batch(call, wait)

    def run(duration: float) -> int:
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            wait([call() for _ in range(batch)])
            calls += batch
        return calls

    run(settle)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM),
                            lib.nvmlDeviceGetCurrentClocksEventReasons(handle)))
            time.sleep(sample_every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    energy0, t0 = lib.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter()
    calls = run(seconds)
    elapsed, energy1 = time.perf_counter() - t0, lib.nvmlDeviceGetTotalEnergyConsumption(handle)
    stop.set()
    sampler.join()
    clocks = sorted(clock for clock, _ in samples) or [0]
    millijoules = energy1 - energy0  # the counter counts mJ since the driver loaded
    return {"ms": elapsed / calls * 1e3, "mJ_per_call": millijoules / calls, "W": millijoules / 1e3 / elapsed,
            "sm_mhz_median": clocks[len(clocks) // 2], "sm_mhz_min": clocks[0],
            "power_capped": sum(bool(reasons & POWER_REASONS) for _, reasons in samples) / max(len(samples), 1),
            "calls": calls}
