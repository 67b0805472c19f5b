"""Energy sensors behind one small interface: cumulative joules, with counter wraps and resets handled.

Every source (NVML energy counter, NVML power integrated by the sampler, RAPL,
the CPU-time estimate) is a :class:`Sensor`. The monitor polls ``read`` from its
sampling thread and never from the training hot path. A sensor that cannot be
opened raises :class:`SensorUnavailable` with the reason, so the monitor can write
that reason down instead of reporting zero.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

RANK_SCOPE = "rank"
"""The sensor measures something only this rank uses (its GPU, its process)."""
NODE_SCOPE = "node"
"""The sensor measures something the node's ranks share (CPU packages, DRAM): read by local rank 0 only."""


class SensorUnavailable(RuntimeError):
    """A sensor cannot be used here; the message says why (missing, permission, unsupported)."""


@dataclass
class Uncertainty:
    """Relative uncertainty of a source, as a fraction of its figure (0.05 = ±5 %)."""

    rel: float
    basis: str


class CounterTracker:
    """Turns raw readings of a hardware energy counter into non-negative joule increments.

    A counter that moves backwards either wrapped (RAPL's ``energy_uj`` wraps at
    ``max_energy_range_uj``) or was reset (a driver reload zeroes NVML's counter).
    It is a wrap when the counter has a known range and the wrapped increment is
    physically plausible for the elapsed time at ``max_power_w``; otherwise it is
    a reset and the new reading is the energy since the reset.
    """

    def __init__(self, *, unit_j: float, max_raw: int | None, max_power_w: float):
        self.unit_j = unit_j
        self.max_raw = max_raw
        self.max_power_w = max_power_w
        self.prev_raw: int | None = None
        self.prev_t: float | None = None
        self.wraps = 0
        self.resets = 0

    def update(self, raw: int, t_s: float) -> float:
        """The energy in joules since the previous reading (0 for the first)."""
        prev, prev_t = self.prev_raw, self.prev_t
        self.prev_raw, self.prev_t = raw, t_s
        if prev is None:
            return 0.0
        if raw >= prev:
            return (raw - prev) * self.unit_j
        dt = max(t_s - (prev_t or t_s), 1e-3)
        plausible_j = self.max_power_w * dt * 1.5 + 1.0
        if self.max_raw is not None:
            wrapped_j = (self.max_raw - prev + raw) * self.unit_j
            if 0 <= wrapped_j <= plausible_j:
                self.wraps += 1
                return wrapped_j
        self.resets += 1
        log.warning("energy counter went backwards (%d -> %d): treated as a reset", prev, raw)
        return raw * self.unit_j


class Sensor(abc.ABC):
    """One energy source for one device.

    Attributes:
        device: what is measured, e.g. ``gpu0``, ``cpu-package-0``, ``dram-0``, ``cpu-process``.
        source: ``nvml_energy``, ``nvml_power``, ``rapl`` or ``estimate``.
        scope: :data:`RANK_SCOPE` or :data:`NODE_SCOPE`.
        estimated: the figure is a model, not a measurement.
        integrated: the figure integrates sampled power rather than reading an energy counter.
        refresh_s: how often the underlying value changes; windows shorter than this are batched.
        lag_s: how old, on average, a reading is when taken (a counter refreshed every R
            seconds is R/2 old; a 1-s power average describes the moment 0.5 s ago).
    """

    device = "unknown"
    source = "unknown"
    scope = RANK_SCOPE
    estimated = False
    integrated = False
    refresh_s = 0.1
    lag_s = 0.0
    stepped = False
    """The value advances in steps every ``refresh_s`` (an energy counter updated periodically)."""
    counted = True
    """False for a cross-check sensor: reported beside the counted figure, never added to totals."""
    note = ""

    @abc.abstractmethod
    def read(self, t_s: float) -> float:
        """Cumulative energy in joules since the sensor was opened, read at monotonic time ``t_s``."""

    @abc.abstractmethod
    def uncertainty(self) -> Uncertainty:
        """The relative uncertainty of this source and where that figure comes from."""

    def describe(self) -> dict:
        """Static facts about the sensor for energy.json (source, scope, assumptions, counters)."""
        return {"device": self.device, "source": self.source, "scope": self.scope, "estimated": self.estimated,
                "integrated": self.integrated, "refresh_s": self.refresh_s,
                "counted": self.counted, "uncertainty_rel": self.uncertainty().rel,
                "uncertainty_basis": self.uncertainty().basis, **({"note": self.note} if self.note else {})}

    def close(self) -> None:
        """Release handles; the default has none."""


# --------------------------------------------------------------------------- CPU-time estimate

# Package TDP in watts and hardware threads per socket for common server CPUs (vendor spec sheets).
CPU_TDP_TABLE: list[tuple[str, float, int]] = [
    (r"EPYC 9654", 360.0, 192),
    (r"EPYC 9554", 360.0, 128),
    (r"EPYC 7763", 280.0, 128),
    (r"EPYC 7742", 225.0, 128),
    (r"EPYC 7543", 225.0, 64),
    (r"EPYC 7B13", 280.0, 128),
    (r"Xeon\(R\) Platinum 8480", 350.0, 112),
    (r"Xeon\(R\) Platinum 8380", 270.0, 80),
    (r"Xeon\(R\) Platinum 8280", 205.0, 56),
    (r"Xeon\(R\) Gold 6248", 150.0, 40),
    (r"Xeon\(R\) CPU @", 165.0, 48),  # the unnamed Xeons cloud VMs report
]
DEFAULT_W_PER_THREAD = 5.0
"""Busy-hardware-thread power when the CPU is unknown: server parts span ~2-4 W/thread at TDP, desktop
parts 4-8 W; 5 W errs high rather than low."""


def cpu_model_name() -> str:
    """The CPU model string from /proc/cpuinfo, or the platform's processor name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def cpu_watts_per_thread(tdp_w: float | None, model: str | None = None) -> tuple[float, str]:
    """Power of one busy hardware thread and the assumption behind it, in words.

    Args:
        tdp_w: configured package TDP per socket (``energy.cpu_tdp_w``); None = look the CPU up.
        model: the CPU model string (read from the machine when None).
    """
    import psutil

    model = model or cpu_model_name()
    threads = psutil.cpu_count(logical=True) or 1
    if tdp_w is not None:
        per_socket = max(1, threads // _sockets())
        return tdp_w / per_socket, (f"configured TDP {tdp_w:g} W per socket shared by {per_socket} hardware threads "
                                    f"of this host ({model})")
    for pattern, tdp, socket_threads in CPU_TDP_TABLE:
        if re.search(pattern, model):
            return tdp / socket_threads, (f"{model}: looked-up TDP {tdp:g} W per socket over {socket_threads} "
                                          f"hardware threads")
    return DEFAULT_W_PER_THREAD, (f"CPU {model!r} not in the TDP table and energy.cpu_tdp_w not set: assumed "
                                  f"{DEFAULT_W_PER_THREAD:g} W per busy hardware thread")


def _sockets() -> int:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            ids = {line.split(":", 1)[1].strip() for line in f if line.startswith("physical id")}
        return max(1, len(ids))
    except OSError:
        return 1


class CpuTimeEstimate(Sensor):
    """Estimated CPU energy of this process and its descendants: CPU seconds × watts per busy thread.

    The process's CPU time, not the machine's load, is the base, so co-located
    jobs on a shared host are not charged to this run. Idle power is not
    attributed (it is drawn whether or not the run exists).
    """

    source = "estimate"
    scope = RANK_SCOPE
    estimated = True
    refresh_s = 0.001
    _CHILDREN_REFRESH_S = 5.0
    """Finding descendants scans /proc (~3 ms), so it is done every few seconds; one that lives shorter
    than that is still counted when it exits and is waited for (the kernel's children CPU times)."""

    def __init__(self, *, tdp_w: float | None = None, pid: int | None = None, model: str | None = None):
        import psutil

        self.device = "cpu-process"
        self.proc = psutil.Process(pid or os.getpid())
        self.own = self.proc.pid == os.getpid()
        self.w_per_thread, self.assumption = cpu_watts_per_thread(tdp_w, model)
        self._children: list = []
        self._children_t = -1e9
        self._last_cpu_s = 0.0
        self._child_cpu_s: dict[int, float] = {}
        self.cpu_s0 = self._cpu_s(time.monotonic())

    def _cpu_s(self, t_s: float) -> float:
        """CPU seconds of the process, its live descendants, and its exited descendants it has waited for."""
        import psutil

        if self.own:
            # CLOCK_PROCESS_CPUTIME_ID: one cheap syscall, nanosecond resolution (psutil parses /proc at 10 ms).
            t = os.times()
            total = time.process_time() + t.children_user + t.children_system
        else:
            t = self.proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
        if t_s - self._children_t > self._CHILDREN_REFRESH_S:
            try:
                self._children = self.proc.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._children_t = t_s
            # A descendant gone from the listing was waited for (a zombie is still listed): its time is now
            # in the kernel's children times, so its last live reading must go or it would count twice.
            live = {c.pid for c in self._children}
            self._child_cpu_s = {pid: cpu for pid, cpu in self._child_cpu_s.items() if pid in live}
        for c in list(self._children):
            try:
                ct = c.cpu_times()
                # Its own waited-for children too (a compiler a rank ran, say): they are in no listing any more.
                self._child_cpu_s[c.pid] = ct.user + ct.system + ct.children_user + ct.children_system
            except psutil.Error:
                # Exited: once waited for, the kernel adds its time to children_user/system above.
                self._children.remove(c)
                self._child_cpu_s.pop(c.pid, None)
        # The exit-to-wait gap could dip the sum for a moment; energy never runs backwards.
        self._last_cpu_s = max(self._last_cpu_s, total + sum(self._child_cpu_s.values()))
        return self._last_cpu_s

    def read(self, t_s: float) -> float:
        return (self._cpu_s(t_s) - self.cpu_s0) * self.w_per_thread

    def cpu_seconds(self) -> float:
        return self._cpu_s(time.monotonic()) - self.cpu_s0

    def uncertainty(self) -> Uncertainty:
        return Uncertainty(0.5, "TDP-based model of CPU time: real package power per busy thread varies "
                                "by roughly a factor of two with load, frequency and memory traffic")

    def describe(self) -> dict:
        return {**super().describe(), "assumption": self.assumption, "w_per_thread": self.w_per_thread}


# --------------------------------------------------------------------------- GPU without NVML

# Board power in watts (vendor spec sheets, SXM parts where both exist).
GPU_BOARD_W: list[tuple[str, float]] = [
    ("H200", 700.0), ("H100", 700.0), ("A100", 400.0), ("V100", 300.0), ("A10", 150.0), ("L40", 300.0),
    ("L4", 72.0), ("T4", 70.0), ("A6000", 300.0), ("4090", 450.0), ("3090", 350.0),
]
DEFAULT_GPU_BOARD_W = 300.0


class GpuBoardPowerEstimate(Sensor):
    """A GPU this process computes on, without NVML: its board power for the whole run (an upper bound)."""

    source = "estimate"
    scope = RANK_SCOPE
    estimated = True
    refresh_s = 0.001

    def __init__(self, name: str, board_w: float | None = None):
        self.device = "gpu"
        self.name = name
        match = next((w for key, w in GPU_BOARD_W if key in name), None)
        self.board_w = board_w or match or DEFAULT_GPU_BOARD_W
        self.assumption = (f"{name}: no NVML, so its {'looked-up' if match else 'assumed default'} board power "
                           f"{self.board_w:g} W is charged for the whole run (an upper bound: real draw is lower "
                           f"when the GPU waits)")
        self.t0_s = time.monotonic()

    @classmethod
    def for_this_process(cls) -> "GpuBoardPowerEstimate | None":
        """The estimate for torch's current CUDA device, or None when this process has not initialised CUDA."""
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        dev = torch.cuda.current_device()
        sensor = cls(torch.cuda.get_device_name(dev))
        sensor.device = f"gpu{dev}"
        return sensor

    def read(self, t_s: float) -> float:
        return self.board_w * max(0.0, t_s - self.t0_s)

    def uncertainty(self) -> Uncertainty:
        return Uncertainty(0.5, "board power charged for wall time: overstates a partly idle GPU, by up to ~2x")

    def describe(self) -> dict:
        return {**super().describe(), "assumption": self.assumption, "model": self.name}
