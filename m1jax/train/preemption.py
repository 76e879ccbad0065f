"""Stopping every process after the same step when any of them is asked to stop (preemption, Ctrl-C).

``PreemptionGuard`` turns SIGTERM (what TPU/GPU schedulers send before preempting) and SIGINT into a local flag;
``guard.agreed()`` is True on every process as soon as the flag is set on any (``sharding.multihost.any_process``,
a collective the loop calls once per step), so all of them stop after the same step, save it and exit cleanly. A
second SIGINT raises KeyboardInterrupt, for a user who does not want to wait for the save.
"""
from __future__ import annotations

import signal

from sharding.multihost import any_process


class PreemptionGuard:
    """Context manager: while active, the ``signals`` set ``requested`` instead of killing the process; previous
    handlers are restored on exit."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum

    def agreed(self) -> bool:
        """Whether any process has been asked to stop (every process must call this at the same step)."""
        return any_process(self.requested)

    def __enter__(self) -> "PreemptionGuard":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
