"""``benchmarks.power.energy_per_call`` (the lightning benchmark's ``--energy``) against a stand-in for NVML whose
energy counter moves by a known amount per call."""
from __future__ import annotations

import pytest

from benchmarks import power


class FakeNvml:
    """pynvml's calls that ``energy_per_call`` makes: an energy counter (mJ) that each ``call`` advances by
    ``mj_per_call``, an SM clock that reads 1400 MHz once and 1620 after, and clock reasons that alternate between
    the software power cap and none."""
    NVML_CLOCK_SM = 1

    def __init__(self, mj_per_call: int):
        self.mj_per_call, self.energy, self.clock_reads, self.reason_reads = mj_per_call, 10_000, 0, 0

    def call(self):
        self.energy += self.mj_per_call
        return object()

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self.energy

    def nvmlDeviceGetClockInfo(self, handle, kind):
        assert kind == self.NVML_CLOCK_SM
        self.clock_reads += 1
        return 1400 if self.clock_reads == 1 else 1620

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self.reason_reads += 1
        return 0x4 if self.reason_reads % 2 else 0


def test_energy_per_call_divides_the_counter_by_the_calls():
    nvml = FakeNvml(mj_per_call=7)
    waited = []
    result = power.energy_per_call(nvml.call, waited.append, seconds=0.2, settle=0.05, sample_every=0.005,
                                   nvml=(nvml, "gpu0"))
    assert result["mJ_per_call"] == 7  # only the calls move the counter
    assert result["W"] * result["ms"] == pytest.approx(7)  # mJ per call = W x ms
    assert result["calls"] > 0 and len(waited) >= 2
    samples = nvml.reason_reads
    assert samples >= 3
    assert (result["sm_mhz_median"], result["sm_mhz_min"]) == (1620, 1400)
    assert result["power_capped"] == pytest.approx((samples + 1) // 2 / samples)


def test_energy_per_call_without_nvml_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(power, "nvml_handle", lambda index=0: None)
    with pytest.raises(RuntimeError, match="needs NVML"):
        power.energy_per_call(lambda: None, lambda _: None)
