"""GPU energy through NVML: the total-energy counter (Volta and newer), else power integrated by the sampler."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from m6.energy.sensors import RANK_SCOPE, CounterTracker, Sensor, SensorUnavailable, Uncertainty

log = logging.getLogger(__name__)

COUNTER_REFRESH_S = 0.1
"""NVML's total-energy counter advances in steps about this far apart."""
POWER_AVERAGING_S = 1.0
"""``nvmlDeviceGetPowerUsage`` on Ampere and newer returns a 1-s average, so a read describes ~0.5 s ago."""


def load_nvml(nvml: Any = None) -> Any:
    """Initialise NVML (``pynvml`` from nvidia-ml-py unless a module-like double is given).

    Raises:
        SensorUnavailable: the library or the driver is missing.
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            raise SensorUnavailable("nvidia-ml-py is not installed (pip install 'm6[energy]')") from None
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, …
        raise SensorUnavailable(f"NVML cannot initialise: {e}") from None
    return nvml


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def rank_gpu_uuid(nvml: Any, local_rank: int) -> str:
    """The UUID of the GPU this rank computes on.

    Taken from torch's current CUDA device when torch has already initialised CUDA,
    else from ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) at position ``local_rank``,
    else NVML index ``local_rank``.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    entry = visible[local_rank % len(visible)] if visible else str(local_rank)
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    try:
        index = int(entry)
    except ValueError:
        raise SensorUnavailable(f"CUDA_VISIBLE_DEVICES entry {entry!r} is neither an index nor a UUID") from None
    count = nvml.nvmlDeviceGetCount()
    if index >= count:
        raise SensorUnavailable(f"no GPU at NVML index {index} (this node has {count})")
    return _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)))


class _NvmlSensor(Sensor):
    scope = RANK_SCOPE

    def __init__(self, nvml: Any, uuid: str):
        self.nvml = nvml
        self.uuid = uuid
        try:
            self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception as e:
            raise SensorUnavailable(f"NVML has no GPU with UUID {uuid}: {e}") from None
        self.name = _text(nvml.nvmlDeviceGetName(self.handle))
        self.device = "gpu"
        self.read_errors = 0

    def describe(self) -> dict:
        return {**super().describe(), "uuid": self.uuid, "model": self.name, "read_errors": self.read_errors}


class NvmlEnergyCounter(_NvmlSensor):
    """The GPU's total-energy counter (millijoules since the driver loaded)."""

    source = "nvml_energy"
    refresh_s = COUNTER_REFRESH_S
    lag_s = COUNTER_REFRESH_S
    stepped = True

    def __init__(self, nvml: Any, uuid: str):
        super().__init__(nvml, uuid)
        self.tracker = CounterTracker(unit_j=1e-3, max_raw=None, max_power_w=2000.0)
        self.energy_j = 0.0
        try:
            raw = nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as e:  # NVMLError_NotSupported before Volta
            raise SensorUnavailable(f"{self.name} ({uuid}) has no total-energy counter: {e}") from None
        import time

        self.tracker.update(int(raw), time.monotonic())

    def read(self, t_s: float) -> float:
        try:
            raw = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as e:
            self.read_errors += 1
            if self.read_errors == 1:
                log.warning("NVML energy read failed on %s: %s (keeping the last value)", self.uuid, e)
            return self.energy_j
        self.energy_j += self.tracker.update(int(raw), t_s)
        return self.energy_j

    def uncertainty(self) -> Uncertainty:
        return Uncertainty(0.05, "NVML power/energy readings: NVIDIA specifies ±5 % accuracy on data-centre GPUs")

    def describe(self) -> dict:
        return {**super().describe(), "wraps": self.tracker.wraps, "resets": self.tracker.resets}


class NvmlPowerIntegrator(_NvmlSensor):
    """GPU power read at the sampler's rate and integrated (trapezoids); for GPUs without the counter."""

    source = "nvml_power"
    integrated = True
    refresh_s = 0.05
    lag_s = POWER_AVERAGING_S / 2

    def __init__(self, nvml: Any, uuid: str):
        super().__init__(nvml, uuid)
        try:
            self._p_w = nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except Exception as e:
            raise SensorUnavailable(f"{self.name} ({uuid}) reports no power: {e}") from None
        self._t_s: float | None = None
        self.energy_j = 0.0

    def read(self, t_s: float) -> float:
        try:
            p_w = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except Exception as e:
            self.read_errors += 1
            if self.read_errors == 1:
                log.warning("NVML power read failed on %s: %s (holding the last value)", self.uuid, e)
            p_w = self._p_w
        if self._t_s is not None:
            self.energy_j += 0.5 * (p_w + self._p_w) * (t_s - self._t_s)
        self._t_s, self._p_w = t_s, p_w
        return self.energy_j

    def uncertainty(self) -> Uncertainty:
        return Uncertainty(0.10, "±5 % sensor accuracy plus the error of integrating 1-s power averages "
                                 "sampled at the monitor's rate (transients shorter than 1 s are smoothed)")


def open_gpu_sensors(local_rank: int, *, nvml: Any = None, cross_check: bool = True) -> list[Sensor]:
    """This rank's GPU sensors: the energy counter, with power integration as a cross-check, or power alone.

    The cross-check sensor carries ``counted = False``: it is reported beside the
    counter's figure, never added to totals.

    Raises:
        SensorUnavailable: no NVML, no GPU for this rank, or neither counter nor power.
    """
    nvml = load_nvml(nvml)
    uuid = rank_gpu_uuid(nvml, local_rank)
    try:
        counter = NvmlEnergyCounter(nvml, uuid)
    except SensorUnavailable as e:
        log.info("%s; integrating sampled power instead", e)
        power = NvmlPowerIntegrator(nvml, uuid)
        power.device = f"gpu{local_rank}"
        power.note = str(e)
        return [power]
    counter.device = f"gpu{local_rank}"
    sensors: list[Sensor] = [counter]
    if cross_check:
        try:
            power = NvmlPowerIntegrator(nvml, uuid)
        except SensorUnavailable:
            return sensors
        power.device = counter.device
        power.counted = False
        sensors.append(power)
    return sensors
