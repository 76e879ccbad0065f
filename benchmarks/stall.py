"""A watchdog that ends a benchmark whose progress has stopped, with a line that says where.

Why: a GPU kernel whose synchronisation is wrong (a barrier waiting for an arrival that never comes) does not fail, it
hangs, and the benchmark prints nothing more until something kills it. On the lent GPU machines that costs the whole
command's time limit. On an H200 in 2026-12, a new kernel's receive barrier asked for 128 times its arrivals: its
first check call hung for 400 s of a 1,800 s budget (``benchmarks/RESULTS.md``, "A minute at the power cap").
With the watchdog the run ends ``stall_seconds`` after its last progress report, naming what it was doing.

Used by ``benchmarks.lightning --stall_seconds``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

# Exit status of a stalled run (as ``timeout``'s, so scripts that check for a time-out see one).
STALL_EXIT_CODE = 124


class StallWatchdog:
    """Calls ``on_stall(what, seconds)`` (default: print one line to stderr and end the process with
    ``STALL_EXIT_CODE``) once ``seconds`` pass without a ``beat``. ``what`` is the last beat's description.

    Use as a context manager; the watchdog thread stops on exit. ``seconds`` <= 0 disables it.
    """

    def __init__(self, seconds: float, on_stall: Callable[[str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, poll_seconds: float = 1.0):
        self.seconds, self.clock, self.poll_seconds = seconds, clock, poll_seconds
        self.on_stall = on_stall or _exit_stalled
        self.last, self.what = clock(), "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def beat(self, what: str) -> None:
        """Report progress: ``what`` is about to run (it names the stall if it never finishes)."""
        self.last, self.what = self.clock(), what

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            idle = self.clock() - self.last
            if idle >= self.seconds:
                self.on_stall(self.what, idle)
                return

    def __enter__(self) -> "StallWatchdog":
        if self.seconds > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _exit_stalled(what: str, idle: float) -> None:
    print(f"stalled: no progress for {idle:.0f} s while running {what}; ending the run", file=sys.stderr, flush=True)
    os._exit(STALL_EXIT_CODE)  # the main thread is stuck in a device call: only a process exit ends it
