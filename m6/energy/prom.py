"""Prometheus: ``m6_*`` metrics in base units (served or pushed) and PromQL cross-checks against DCGM/Kepler."""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
import urllib.request
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


# --------------------------------------------------------------------------- exporter cross-checks

DCGM_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
"""dcgm-exporter's total-energy counter, in millijoules, labelled with the GPU's ``UUID``."""
KEPLER_METRIC = "kepler_container_joules_total"
"""Kepler's per-container energy counter, in joules, labelled with ``pod_name``."""


def promql(base_url: str, query: str, at_unix_s: float, timeout_s: float = 10.0) -> float | None:
    """Evaluate an instant query at ``at_unix_s``; the scalar sum of its result, None when it is empty.

    Raises:
        OSError: the server is unreachable or answered with an error (the message has the query).
    """
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": f"{at_unix_s:.3f}"})
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=timeout_s).read())
    except OSError as e:
        raise OSError(f"Prometheus {base_url}: query {query!r} failed: {e}") from e
    if body.get("status") != "success":
        raise OSError(f"Prometheus {base_url}: query {query!r}: {body.get('error', body)}")
    result = body["data"]["result"]
    if not result:
        return None
    return sum(float(r["value"][1]) for r in result)


def _range(duration_s: float) -> str:
    return f"{max(1, round(duration_s * 1000))}ms"


def cross_check(doc: dict, base_url: str, pod_name: str | None = None) -> list[dict]:
    """Exporter figures for the run in ``doc``: DCGM for its GPUs, Kepler for its pod.

    ``increase()`` over the run's span evaluated at its end, so the exporters' own
    scrape interval bounds the agreement (a 15-s scrape on a 60-s run leaves up to
    a quarter of the run to extrapolation).
    """
    start = doc.get("started_unix_s")
    if start is None:
        return [{"source": "prometheus", "error": "energy.json has no started_unix_s; cannot align the span"}]
    end, span = start + doc["duration_s"], _range(doc["duration_s"])
    out = []
    gpus = [d for d in doc["devices"] if d["source"] in ("nvml_energy", "nvml_power") and d.get("uuid")]
    if gpus:
        uuids = "|".join(sorted({d["uuid"] for d in gpus}))
        q = f'sum(increase({DCGM_METRIC}{{UUID=~"{uuids}"}}[{span}])) / 1000'
        ours = sum(d["energy_j"] for d in gpus)
        out.append(_entry("dcgm", q, base_url, end, ours))
    pod = pod_name or os.environ.get("POD_NAME") or (os.environ.get("HOSTNAME") if os.environ.get(
        "KUBERNETES_SERVICE_HOST") else None)
    if pod:
        q = f'sum(increase({KEPLER_METRIC}{{pod_name="{pod}"}}[{span}]))'
        out.append(_entry("kepler", q, base_url, end, doc["totals"]["it_energy_j"]))
    return out


def _entry(source: str, query: str, base_url: str, at: float, ours_j: float) -> dict:
    try:
        theirs = promql(base_url, query, at)
    except OSError as e:
        log.warning("%s cross-check failed: %s", source, e)
        return {"source": source, "query": query, "error": str(e), "ours_j": ours_j}
    if theirs is None:
        return {"source": source, "query": query, "error": "no series matched", "ours_j": ours_j}
    return {"source": source, "query": query, "energy_j": theirs, "ours_j": ours_j,
            "diff_rel": (theirs - ours_j) / ours_j if ours_j else None}
