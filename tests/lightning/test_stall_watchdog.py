"""``benchmarks.stall.StallWatchdog`` (``benchmarks.lightning --stall_seconds``): a run whose progress stops ends,
naming the step it was in; a run that keeps reporting does not."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from benchmarks import stall


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _watch(seconds, clock):
    stalls, fired = [], threading.Event()

    def on_stall(what, idle):
        stalls.append((what, idle))
        fired.set()
    return stall.StallWatchdog(seconds, on_stall=on_stall, clock=clock, poll_seconds=0.005), stalls, fired


def test_beats_keep_the_run_alive_and_silence_ends_it_naming_the_last_step():
    clock = FakeClock()
    watchdog, stalls, fired = _watch(10.0, clock)
    with watchdog:
        for step in range(5):  # 9 s between reports: under the limit every time
            clock.now += 9.0
            watchdog.beat(f"step {step}")
            time.sleep(0.02)
        assert not stalls
        clock.now += 10.5  # then nothing for 10.5 s
        assert fired.wait(5.0)
    assert stalls == [("step 4", 10.5)]


def test_zero_seconds_never_fires():
    clock = FakeClock()
    watchdog, stalls, _ = _watch(0.0, clock)
    with watchdog:
        clock.now += 1e6
        time.sleep(0.05)
    assert not stalls


def test_a_stalled_process_exits_with_124_and_says_where():
    code = ("import time; from benchmarks.stall import StallWatchdog\n"
            "with StallWatchdog(0.3, poll_seconds=0.05) as w:\n"
            "    w.beat('phase=check impl=mosaic')\n"
            "    time.sleep(30)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == stall.STALL_EXIT_CODE == 124
    assert "while running phase=check impl=mosaic" in done.stderr
    assert time.monotonic() - start < 20  # it did not sleep the 30 s out
