"""Hardware doubles that behave like the hardware: an NVML module and a RAPL powercap tree.

Both derive their readings from a known power profile over the system-wide
monotonic clock, so a test (or another process) can compute the true energy of
any interval and compare the monitor's figure against it.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from pathlib import Path

import pynvml

SLOT_S = 0.05
"""The GPU power profile changes every 50 ms (a training step's phases are about this short)."""


class GpuProfile:
    """A deterministic, bursty power draw: piecewise constant over 50-ms slots."""

    def __init__(self, base_w: float, swing_w: float, seed: int, epoch_s: float):
        self.base_w, self.swing_w, self.seed, self.epoch_s = base_w, swing_w, seed, epoch_s
        self._cum = [0.0]

    def power_w(self, k: int) -> float:
        return self.base_w + self.swing_w * (((k + 1) * (7919 + self.seed)) % 13) / 12.0

    def energy_j(self, t_s: float) -> float:
        """True energy drawn from ``epoch_s`` to ``t_s``."""
        x = max(0.0, t_s - self.epoch_s) / SLOT_S
        k = int(math.floor(x))
        while len(self._cum) <= k:
            self._cum.append(self._cum[-1] + self.power_w(len(self._cum) - 1) * SLOT_S)
        return self._cum[k] + self.power_w(k) * (x - k) * SLOT_S


class FakeGpu:
    """One GPU: a total-energy counter in mJ that advances every ``refresh_s``; power as 1-s averages in mW."""

    def __init__(self, index: int, profile: GpuProfile, *, has_counter: bool = True, refresh_s: float = 0.1,
                 counter_at_epoch_mj: int = 123_456_789, name: str = "Fake H100"):
        self.index, self.profile, self.has_counter, self.refresh_s = index, profile, has_counter, refresh_s
        self.uuid = f"GPU-00000000-0000-0000-0000-{index:012d}"
        self.name = name
        self.offset_mj = counter_at_epoch_mj
        self.reset_at_s: float | None = None

    def counter_mj(self, t_s: float) -> int:
        ep = self.profile.epoch_s
        t_update = ep + math.floor((t_s - ep) / self.refresh_s) * self.refresh_s
        if self.reset_at_s is not None and t_update >= self.reset_at_s:
            # A driver reload: the counter restarts from zero at the reset.
            return int(1000 * (self.profile.energy_j(t_update) - self.profile.energy_j(self.reset_at_s)))
        return self.offset_mj + int(1000 * self.profile.energy_j(t_update))

    def power_mw(self, t_s: float) -> int:
        return int(1000 * (self.profile.energy_j(t_s) - self.profile.energy_j(t_s - 1.0)))


class FakeNvml:
    """A module-like double of ``pynvml`` for the calls m6.energy.nvml makes; errors are pynvml's own."""

    NVMLError = pynvml.NVMLError
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED

    def __init__(self, gpus: list[FakeGpu], *, driver_loaded: bool = True):
        self.gpus = gpus
        self.driver_loaded = driver_loaded
        self.calls = 0

    def nvmlInit(self):
        if not self.driver_loaded:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetName(self, h):
        return h.name

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.calls += 1
        if not h.has_counter:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.counter_mj(time.monotonic())

    def nvmlDeviceGetPowerUsage(self, h):
        self.calls += 1
        return h.power_mw(time.monotonic())


def fake_nvml(n_gpus: int = 1, *, epoch_s: float | None = None, has_counter: bool = True) -> FakeNvml:
    epoch = time.monotonic() - 2.0 if epoch_s is None else epoch_s
    return FakeNvml([FakeGpu(i, GpuProfile(200.0 + 50 * i, 150.0, seed=i, epoch_s=epoch), has_counter=has_counter)
                     for i in range(n_gpus)])


class FakeRapl:
    """A powercap tree in a folder, its ``energy_uj`` files advanced by a writer thread like the kernel's.

    Zones: package-0 with core (a part of the package) and dram subzones, package-1, and
    psys (the whole platform). Counters wrap at ``max_energy_range_uj``, which is small here so
    that a short test sees several wraps.
    """

    ZONES = {  # directory: (name, watts)
        "intel-rapl:0": ("package-0", 45.0),
        "intel-rapl:0:0": ("core", 30.0),
        "intel-rapl:0:1": ("dram", 6.0),
        "intel-rapl:1": ("package-1", 35.0),
        "intel-rapl:2": ("psys", 120.0),
    }
    COUNTED = ("intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1")

    def __init__(self, root: Path, *, max_range_uj: int = 20_000_000, period_s: float = 0.005,
                 epoch_s: float | None = None):
        self.root = Path(root)
        self.max_range_uj = max_range_uj
        self.period_s = period_s
        self.epoch_s = time.monotonic() if epoch_s is None else epoch_s
        self.root.mkdir(parents=True, exist_ok=True)
        for d, (name, _w) in self.ZONES.items():
            z = self.root / d
            z.mkdir(exist_ok=True)
            (z / "name").write_text(name + "\n")
            (z / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        self._write(time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def true_energy_j(self, directory: str, t_s: float) -> float:
        return self.ZONES[directory][1] * (t_s - self.epoch_s)

    def counted_energy_j(self, t0_s: float, t1_s: float) -> float:
        """True joules the package and DRAM zones drew in ``[t0_s, t1_s]`` (what a monitor should report)."""
        return sum(self.true_energy_j(d, t1_s) - self.true_energy_j(d, t0_s) for d in self.COUNTED)

    def _write(self, t_s: float) -> None:
        for d in self.ZONES:
            uj = int(self.true_energy_j(d, t_s) * 1e6) % (self.max_range_uj + 1)
            tmp = self.root / d / ".energy_uj.tmp"
            tmp.write_text(f"{uj}\n")
            os.replace(tmp, self.root / d / "energy_uj")  # readers never see a half-written value

    def start(self) -> "FakeRapl":
        def run():
            while not self._stop.wait(self.period_s):
                self._write(time.monotonic())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
