"""``benchmarks.timing.pipelined_seconds`` (how the lightning benchmark times ours and ``fla_pipelined``) against a
fake clock that each call moves by a fixed time: the calls it makes (compile, warm-up, five batches) and the time per
call it reports."""
from __future__ import annotations

import pytest

from benchmarks import timing

CALL_SECONDS = 2.0 ** -10  # exact in binary, so the protocol's counts come out exact


class FakeDevice:
    """A device whose every queued call takes ``CALL_SECONDS`` of the fake clock; ``wait`` returns at once."""

    def __init__(self):
        self.now, self.calls = 100.0, 0

    def clock(self):
        return self.now

    def call(self):
        self.calls += 1
        self.now += CALL_SECONDS
        return object()


BATCH = 30  # calls that take about 30 ms: int(0.03 / CALL_SECONDS)


# Warm-up batches: as many as it takes to reach the warm-up time, at least one (each takes 30 / 1024 s).
@pytest.mark.parametrize("warmup_seconds, warmup_batches", [(None, 11), (0.25, 9), (2.0, 69), (0.0, 1)])
def test_pipelined_seconds_warms_up_for_the_given_time(monkeypatch, warmup_seconds, warmup_batches):
    device = FakeDevice()
    monkeypatch.setattr(timing.time, "perf_counter", device.clock)
    kwargs = {} if warmup_seconds is None else {"warmup_seconds": warmup_seconds}
    seconds = timing.pipelined_seconds(device.call, lambda _: None, **kwargs)
    assert seconds == CALL_SECONDS
    # compile + timing call, the warm-up batches, five timed batches
    assert device.calls == 2 + warmup_batches * BATCH + 5 * BATCH


def test_pipelined_seconds_rejects_a_negative_warmup():
    device = FakeDevice()
    with pytest.raises(ValueError, match="warmup_seconds must be >= 0"):
        timing.pipelined_seconds(device.call, lambda _: None, warmup_seconds=-1.0)
    assert device.calls == 0  # refused before any call
