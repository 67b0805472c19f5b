"""Prometheus export: ``m6_*`` metrics in base units, read from the monitor at scrape time, served or pushed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from m6.energy.carbon import carbon_g, grid_intensity

if TYPE_CHECKING:
    from m6.energy.monitor import EnergyMonitor

log = logging.getLogger(__name__)


class MonitorCollector:
    """A custom collector: the training thread never touches a metric object; a scrape reads the ledger."""

    def __init__(self, monitor: "EnergyMonitor"):
        self.m = monitor
        self.gco2_per_kwh = grid_intensity(monitor.cfg)["gco2_per_kwh"]

    def describe(self):
        # Empty: registering must not trigger a collect() before the monitor has started.
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.m
        base = ["run_id", "rank", "node"]
        base_v = [m.run_id, str(m.rank), m.node_id]
        dev_labels = ["device", "source", "estimated", *base]
        energy = CounterMetricFamily("m6_energy_joules", "Energy drawn, by device, source and stage (IT energy).",
                                     labels=[*dev_labels, "stage"])
        check = CounterMetricFamily("m6_energy_cross_check_joules",
                                    "Energy from a cross-check source, never part of m6_energy_joules_total.",
                                    labels=[*dev_labels, "stage"])
        power = GaugeMetricFamily("m6_power_watts", "Mean power over the latest sampling interval.",
                                  labels=dev_labels)
        carbon = CounterMetricFamily("m6_carbon_grams", "CO2e of the energy so far, × PUE × grid intensity.",
                                     labels=base)
        tokens = CounterMetricFamily("m6_tokens", "Training tokens processed.", labels=base)
        steps = CounterMetricFamily("m6_steps", "Training steps completed.", labels=base)
        overhead = CounterMetricFamily("m6_tracker_overhead_seconds", "CPU time of the energy sampler thread.",
                                       labels=base)
        with m._lock:
            led = m.ledger
            if led is not None:
                stage_j = {st: list(per) for st, per in led.stage_j.items()}
                watts = list(led.last_power_w)
                n_tokens, n_steps = led.tokens, led.steps
            else:
                stage_j, watts, n_tokens, n_steps = {}, [0.0] * len(m.sensors), 0, 0
        total_j = 0.0
        for i, s in enumerate(m.sensors):
            labels = [s.device, s.source, "true" if s.estimated else "false", *base_v]
            fam = energy if s.counted else check
            for stage, per in stage_j.items():
                fam.add_metric([*labels, stage], per[i])
                if s.counted:
                    total_j += per[i]
            if s.counted:
                power.add_metric(labels, watts[i])
        carbon.add_metric(base_v, carbon_g(total_j, m.cfg.pue, self.gco2_per_kwh))
        tokens.add_metric(base_v, float(n_tokens))
        steps.add_metric(base_v, float(n_steps))
        overhead.add_metric(base_v, m.overhead_s)
        yield from (energy, check, power, carbon, tokens, steps, overhead)


def monitor_registry(monitor: "EnergyMonitor"):
    """A fresh CollectorRegistry holding only this monitor's metrics."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(MonitorCollector(monitor))
    return reg


def serve(registry, port: int, addr: str = "0.0.0.0"):
    """Serve ``registry`` on ``/metrics``; returns ``(server, bound_port)``."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = server.server_address[1]
    log.info("serving energy metrics on http://%s:%d/metrics", addr, bound)
    return server, bound


def push(registry, gateway_url: str, job: str, grouping_key: dict[str, str]) -> None:
    """Push ``registry`` to a Pushgateway, replacing the group ``job`` + ``grouping_key``.

    Raises:
        OSError: the gateway is unreachable or refused the push (the message names it).
    """
    from prometheus_client import push_to_gateway

    try:
        push_to_gateway(gateway_url, job=job, registry=registry, grouping_key=grouping_key, timeout=10)
    except OSError as e:
        raise OSError(f"push to Pushgateway {gateway_url} (job {job!r}) failed: {e}") from e
