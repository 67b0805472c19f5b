"""CPU package and DRAM energy from Linux powercap (RAPL): node-level counters in microjoules that wrap."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from m6.energy.sensors import NODE_SCOPE, CounterTracker, Sensor, SensorUnavailable, Uncertainty

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/class/powercap"
MAX_ZONE_POWER_W = 1000.0
"""No RAPL zone draws more; a backwards step implying more than this is a reset, not a wrap."""


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


class RaplZone(Sensor):
    """One RAPL zone (``package-N`` or its ``dram`` subzone), read from ``energy_uj``."""

    source = "rapl"
    scope = NODE_SCOPE
    refresh_s = 0.001
    lag_s = 0.0

    def __init__(self, path: Path, device: str):
        self.path = Path(path)
        self.device = device
        self.energy_file = self.path / "energy_uj"
        try:
            max_raw = int(_read(self.path / "max_energy_range_uj"))
            raw = int(_read(self.energy_file))
        except PermissionError:
            raise SensorUnavailable(
                f"permission denied reading {self.energy_file} (root-only on kernels patched for "
                f"CVE-2020-8694; run as root or grant read access)") from None
        except (OSError, ValueError) as e:
            raise SensorUnavailable(f"cannot read RAPL zone {self.path}: {e}") from None
        self.tracker = CounterTracker(unit_j=1e-6, max_raw=max_raw, max_power_w=MAX_ZONE_POWER_W)
        self.tracker.update(raw, time.monotonic())
        self.energy_j = 0.0
        self.read_errors = 0

    def read(self, t_s: float) -> float:
        try:
            raw = int(_read(self.energy_file))
        except (OSError, ValueError) as e:
            self.read_errors += 1
            if self.read_errors == 1:
                log.warning("RAPL read failed on %s: %s (keeping the last value)", self.energy_file, e)
            return self.energy_j
        self.energy_j += self.tracker.update(raw, t_s)
        return self.energy_j

    def uncertainty(self) -> Uncertainty:
        return Uncertainty(0.10, "RAPL package/DRAM counters: model-based on older parts, measured since "
                                 "Haswell; published validations agree with wall meters within ~10 %")

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "wraps": self.tracker.wraps,
                "resets": self.tracker.resets, "max_energy_range_uj": self.tracker.max_raw,
                "read_errors": self.read_errors}


def discover_rapl(root: str | Path = DEFAULT_ROOT) -> list[RaplZone]:
    """Open every package zone and every DRAM zone under ``root``.

    ``core`` and ``uncore`` subzones are parts of their package and ``psys``
    covers the whole platform, so reading them too would double count.

    Raises:
        SensorUnavailable: no RAPL zones, or none readable (the reason names the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise SensorUnavailable(f"no powercap interface at {root} (not Linux, RAPL driver not loaded, or a VM)")
    zones, reasons = [], []
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"(intel-rapl|amd-rapl):(\d+)(?::(\d+))?", d.name)
        if not m:
            continue
        try:
            name = _read(d / "name")
        except OSError as e:
            reasons.append(f"{d}/name: {e}")
            continue
        pkg = m.group(2)
        if name.startswith("package"):
            device = f"cpu-{name}"
        elif name == "dram":
            device = f"dram-{pkg}"
        else:
            continue
        try:
            zones.append(RaplZone(d, device))
        except SensorUnavailable as e:
            reasons.append(str(e))
    if not zones:
        why = "; ".join(reasons) if reasons else f"no package or dram zones under {root}"
        raise SensorUnavailable(why)
    return zones
