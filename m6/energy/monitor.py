"""EnergyMonitor: sensors polled by a background thread, named windows and step boundaries, energy.json out.

Typical use in a trainer (``step`` is a clock read and an append: no device sync, no I/O)::

    mon = EnergyMonitor(cfg.energy, run_id=run_id, rank=rank, world_size=world, local_rank=local_rank)
    mon.start()
    with mon.window("train"):
        for step in range(steps):
            ...forward, backward, optimizer...
            mon.step(step, tokens_in_this_step)
    doc = mon.stop()           # every rank calls it; figures are reduced across ranks
    if rank == 0:
        mon.write(out_uri + "/energy.json")
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from m6.config import EnergyConfig
from m6.energy.carbon import grid_intensity
from m6.energy.ledger import BEGIN, END, STEP, Event, Ledger
from m6.energy.sensors import NODE_SCOPE, CpuTimeEstimate, GpuBoardPowerEstimate, Sensor, SensorUnavailable
from m6.energy.summary import build_document

log = logging.getLogger(__name__)


def discover_sensors(cfg: EnergyConfig, *, local_rank: int = 0, unavailable: list[dict] | None = None,
                     nvml: Any = None) -> list[Sensor]:
    """The best sources this process can use, in priority order; each miss is written to ``unavailable``.

    GPU: the NVML energy counter, else NVML power integration, else (a GPU in use without
    NVML) its board power over the run, flagged ``estimated``. CPU and DRAM: RAPL
    (node-level; opened on local rank 0 only). Where no CPU sensor is readable,
    the process's CPU time is turned into an estimate, flagged ``estimated``.
    """
    from m6.energy.nvml import open_gpu_sensors
    from m6.energy.rapl import discover_rapl

    missing = unavailable if unavailable is not None else []
    sensors: list[Sensor] = []
    try:
        sensors += open_gpu_sensors(local_rank, nvml=nvml, cross_check=cfg.gpu_power_cross_check)
    except SensorUnavailable as e:
        missing.append({"sensor": "gpu", "reason": str(e)})
        gpu = GpuBoardPowerEstimate.for_this_process()
        if gpu is not None:  # a GPU is in use but unmetered: estimate it rather than leave it out
            sensors.append(gpu)
    cpu_measured = False
    if local_rank == 0:
        try:
            sensors += discover_rapl(cfg.rapl_root)
            cpu_measured = True
        except SensorUnavailable as e:
            missing.append({"sensor": "rapl", "reason": str(e)})
    else:
        # Local rank 0 reads the node's RAPL; the other ranks add no CPU figure of their own when it can.
        try:
            discover_rapl(cfg.rapl_root)
            cpu_measured = True
        except SensorUnavailable:
            pass
    if not cpu_measured:
        sensors.append(CpuTimeEstimate(tdp_w=cfg.cpu_tdp_w))
    return sensors


class EnergyMonitor:
    """Measures a run's energy per device, rank, stage and step group.

    Args:
        cfg: energy settings (sampling rate, PUE, grid intensity, TDP assumption).
        run_id: label on every metric and in energy.json.
        rank, world_size, local_rank: this process's place in a torch.distributed job.
        node_id: node name (default: the host name); node-level sensors count once per node.
        sensors: sensors to use instead of discovering them (tests pass hardware doubles).
        flops_per_token: training FLOPs per token, for J/FLOP (from ``m6.model.params.count_params``).
    """

    def __init__(self, cfg: EnergyConfig, *, run_id: str, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 node_id: str | None = None, sensors: list[Sensor] | None = None,
                 flops_per_token: float | None = None):
        self.cfg = cfg
        self.run_id = run_id
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node_id = node_id or socket.gethostname()
        self.flops_per_token = flops_per_token
        self.unavailable: list[dict] = []
        if sensors is None:
            sensors = discover_sensors(cfg, local_rank=local_rank, unavailable=self.unavailable) if cfg.enabled else []
        # Node-level sensors are read by one rank per node, so the job total does not scale with ranks per node.
        self.sensors = [s for s in sensors if s.scope != NODE_SCOPE or local_rank == 0]
        self.keys = self._keys(self.sensors)
        self._events: collections.deque[Event] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._open: list[str] = []
        self.ledger: Ledger | None = None
        self.t0_s = 0.0
        self.t1_s = 0.0
        """Monotonic start and stop times: the span the figures cover."""
        self.started_at = ""
        self.started_unix_s = 0.0
        self.overhead_s = 0.0
        self.document: dict | None = None
        self._registry = None
        self._servers: list = []
        # A stepped counter is polled four times per update so its update moments are placed within
        # 1/8 of its period; other sensors are read at the configured rate.
        self.period_s = min([1.0 / cfg.sample_hz] + [s.refresh_s / 4 for s in self.sensors if s.stepped])
        # Step groups span at least the slowest counted sensor's refresh period and one sampling period:
        # the timeline cannot resolve anything shorter.
        self.min_window_s = max([s.refresh_s for s in self.sensors if s.counted] + [self.period_s])
        grid_intensity(cfg)  # an unknown grid region fails here, not after the run

    @staticmethod
    def _keys(sensors: list[Sensor]) -> list[str]:
        keys, seen = [], collections.Counter()
        for s in sensors:
            k = f"{s.device}:{s.source}"
            seen[k] += 1
            keys.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
        return keys

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "EnergyMonitor":
        """Take the first reading and start the sampling thread."""
        if self._thread is not None:
            raise RuntimeError("EnergyMonitor.start() called twice")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.started_at, self.started_unix_s = now.isoformat(timespec="seconds"), now.timestamp()
        self.t0_s = time.monotonic()
        self.ledger = Ledger(lags_s=[s.lag_s for s in self.sensors], counted=[s.counted for s in self.sensors],
                             min_window_s=self.min_window_s, t0_s=self.t0_s,
                             stepped_s=[s.refresh_s if s.stepped else 0.0 for s in self.sensors])
        self._poll()
        if not self.sensors:
            return self
        self._thread = threading.Thread(target=self._run, name="m6-energy-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        cpu0 = time.thread_time()
        next_t = time.monotonic()
        failures = 0
        while not self._stop.is_set():
            next_t += self.period_s
            try:
                self._poll()
            except Exception:  # a sampler that dies would silently freeze the figures: log and keep going
                failures += 1
                if failures == 1:
                    log.exception("energy sampler: a poll failed (further failures are counted, not logged)")
            self.overhead_s = time.thread_time() - cpu0
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (a loaded host): skip ahead rather than burst
                next_t = time.monotonic()
                delay = 0.0
            self._stop.wait(delay)
        self.overhead_s = time.thread_time() - cpu0

    def _poll(self) -> None:
        with self._lock:
            if not self.sensors:
                return
            t = time.monotonic()
            energies = [s.read(t) for s in self.sensors]
            while self._events:
                self.ledger.add_event(self._events.popleft())
            self.ledger.add_sample(t, energies)

    # ------------------------------------------------------------------ hot path

    def step(self, step: int, tokens: int) -> None:
        """Mark the end of training step ``step``, which processed ``tokens`` tokens (cheap: no sync, no I/O).

        A step starts at the previous ``step`` call or at the latest window boundary.
        """
        if self._thread is None:
            return
        self._events.append(Event(time.monotonic(), STEP, step=step, tokens=tokens))

    def begin(self, stage: str) -> None:
        """Open a named window; energy until the matching ``end`` is attributed to ``stage``."""
        self._open.append(stage)
        if self._thread is not None:
            self._events.append(Event(time.monotonic(), BEGIN, stage=stage))

    def end(self, stage: str) -> None:
        """Close the innermost open window named ``stage``.

        Raises:
            ValueError: no window named ``stage`` is open.
        """
        if stage not in self._open:
            raise ValueError(f"EnergyMonitor.end({stage!r}): no open window of that name (open: {self._open})")
        t = time.monotonic()
        del self._open[len(self._open) - 1 - self._open[::-1].index(stage)]
        if self._thread is not None:
            self._events.append(Event(t, END, stage=stage))

    @contextlib.contextmanager
    def window(self, stage: str) -> Iterator["EnergyMonitor"]:
        """``with monitor.window("train"): ...`` — begin/end around the block."""
        self.begin(stage)
        try:
            yield self
        finally:
            self.end(stage)

    # ------------------------------------------------------------------ results

    def totals(self, reduce: bool = False) -> dict:
        """Running figures: joules so far (measured and estimated), tokens and steps.

        They are as of the sensors' common horizon, which trails the present by the
        slowest sensor's lag (0.05 s for energy counters, 0.5 s for 1-s power averages).

        Args:
            reduce: sum over the torch.distributed job (a collective: every rank must call it).
        """
        with self._lock:
            led = self.ledger
            per = led.sensor_totals_j() if led else [0.0] * len(self.sensors)
            tokens = led.tokens if led else 0
            steps = led.steps if led else 0
        measured = sum(j for j, s in zip(per, self.sensors) if s.counted and not s.estimated)
        estimated = sum(j for j, s in zip(per, self.sensors) if s.counted and s.estimated)
        vals = [measured, estimated, float(tokens), float(steps)]
        if reduce and _dist_ready():
            import torch
            import torch.distributed as dist

            t = torch.tensor(vals[:3], dtype=torch.float64)
            dist.all_reduce(t)
            vals = [*t.tolist(), vals[3]]
        return {"energy_j": vals[0] + vals[1], "measured_j": vals[0], "estimated_j": vals[1],
                "tokens": int(vals[2]), "steps": int(vals[3])}

    def local_part(self) -> dict:
        """This rank's figures as a JSON-ready dict (what ``stop`` gathers from every rank)."""
        led = self.ledger
        per = led.sensor_totals_j()
        devices = []
        for key, s, j in zip(self.keys, self.sensors, per):
            devices.append({**s.describe(), "key": key, "energy_j": j})
        bin_s, watts = led.power_series()
        series = {key: [row[i] for row in watts] for i, key in enumerate(self.keys)}
        stages = {stage: dict(zip(self.keys, per_j)) for stage, per_j in led.stage_j.items()}
        windows = [{k: v for k, v in w.items() if k != "per_sensor_j"} for w in led.windows]
        return {"rank": self.rank, "node": self.node_id, "started_at": self.started_at,
                "started_unix_s": self.started_unix_s,
                "duration_s": (led.tau_s or self.t0_s) - self.t0_s, "devices": devices, "stages": stages,
                "stage_time_s": dict(led.stage_time_s), "windows": windows, "steps": list(led.groups),
                "tokens": led.tokens, "steps_done": led.steps, "power": {"bin_s": bin_s, "series": series},
                "unavailable": list(self.unavailable), "overhead_s": self.overhead_s}

    def stop(self) -> dict:
        """Stop sampling and return the energy.json document for the whole job.

        In a torch.distributed job every rank must call it: parts are gathered from
        all ranks and merged, node-level sensors counted once per node.
        """
        if self.document is not None:
            return self.document
        if self.ledger is None:
            raise RuntimeError("EnergyMonitor.stop() before start()")
        t_stop = self.t1_s = time.monotonic()
        with self._lock:
            self.ledger.stop_s = t_stop
        # Readings describe the moment lag_s ago: wait until every timeline covers the stop time.
        lag = max((s.lag_s for s in self.sensors), default=0.0)
        if lag > 0:
            time.sleep(min(lag + self.period_s, 1.5))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None  # later step/begin calls are no-ops instead of piling up
        with self._lock:
            self._poll_locked_final(t_stop)
            part = self.local_part()
        parts = [part]
        if self.world_size > 1 and _dist_ready():
            import torch.distributed as dist

            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, part)
        self.document = build_document(parts, self.cfg, run_id=self.run_id, flops_per_token=self.flops_per_token)
        if not self.sensors:
            self.document["disabled"] = not self.cfg.enabled
        for s in self.sensors:
            s.close()
        if self.cfg.prometheus_cross_check and self.rank == 0:
            from m6.energy.prom import cross_check

            self.document["external_cross_checks"] = cross_check(self.document, self.cfg.prometheus_cross_check)
        if self.cfg.pushgateway:
            # A short pipeline step is gone before any scrape: its final figures go to the Pushgateway.
            try:
                self.push(self.cfg.pushgateway, job=f"m6-{self.run_id}")
                self.document["pushed_to"] = self.cfg.pushgateway
            except OSError as e:
                log.warning("%s", e)
                self.document["push_error"] = str(e)
        return self.document

    def _poll_locked_final(self, t_stop: float) -> None:
        if self.sensors:
            t = time.monotonic()
            energies = [s.read(t) for s in self.sensors]
            while self._events:
                self.ledger.add_event(self._events.popleft())
            self.ledger.add_sample(t, energies)
        self.ledger.finish(t_stop)

    def write(self, uri: str) -> None:
        """Write the energy.json document (after ``stop``) to a local path or s3:// URI."""
        from m6 import storage

        if self.document is None:
            raise RuntimeError("EnergyMonitor.write() before stop()")
        storage.write_json(uri, self.document)

    # ------------------------------------------------------------------ Prometheus

    @property
    def registry(self):
        """A prometheus_client CollectorRegistry exposing this monitor's ``m6_*`` metrics."""
        if self._registry is None:
            from m6.energy.prom import monitor_registry

            self._registry = monitor_registry(self)
        return self._registry

    def serve_metrics(self, port: int = 0, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from a background thread; returns the bound port (``port=0`` picks a free one)."""
        from m6.energy.prom import serve

        server, bound = serve(self.registry, port, addr)
        self._servers.append(server)
        return bound

    def push(self, gateway_url: str, job: str) -> None:
        """Push the current metrics to a Pushgateway (short pipeline steps that are never scraped)."""
        from m6.energy.prom import push

        push(self.registry, gateway_url, job, {"run_id": self.run_id, "rank": str(self.rank)})

    def close(self) -> None:
        """Stop any /metrics servers this monitor started."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()


def _dist_ready() -> bool:
    import sys

    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())
