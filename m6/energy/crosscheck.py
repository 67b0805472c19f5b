"""Cross-checks against cluster exporters: DCGM's GPU energy counter or Kepler's per-pod joules, via PromQL.

Our figure stays the reported one; the exporter's figure for the same span and the
same GPUs (or the same pod) is written beside it with the relative difference.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
import urllib.request

log = logging.getLogger(__name__)

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
