"""The energy.json document: every rank's figures merged, node-level sources counted once, carbon added."""

from __future__ import annotations

import collections
from typing import Any

from m6.config import EnergyConfig
from m6.energy.carbon import J_PER_KWH, carbon_g, comparisons, grid_intensity

SCHEMA = "m6.energy/v1"


def _dedupe_devices(parts: list[dict]) -> tuple[list[dict], list[dict]]:
    """All counted device records, each node-level device kept once per node; and the duplicates dropped."""
    seen: set[tuple[str, str, str]] = set()
    kept, dropped = [], []
    for p in parts:
        for d in p["devices"]:
            if d["scope"] == "node":
                key = (p["node"], d["device"], d["source"])
                if key in seen:
                    dropped.append({**d, "rank": p["rank"], "node": p["node"]})
                    continue
                seen.add(key)
            kept.append({**d, "rank": p["rank"], "node": p["node"]})
    return kept, dropped


def _per_step(groups: list[dict], field: str) -> dict[int, float]:
    """Per-step shares of a group figure (joules or tokens), spread evenly over the group's steps."""
    out: dict[int, float] = {}
    for g in groups:
        n = max(1, g["n_steps"])
        for k in range(n):
            out[g["first"] + k] = out.get(g["first"] + k, 0.0) + g[field] / n
    return out


def _merge_steps(parts: list[dict]) -> list[dict]:
    """Rank 0's step groups carrying every rank's joules and tokens for the same steps."""
    ordered = sorted(parts, key=lambda p: p["rank"])
    base, others = ordered[0], ordered[1:]
    energy = [_per_step(p["steps"], "energy_j") for p in others]
    tokens = [_per_step(p["steps"], "tokens") for p in others]
    out = []
    for g in base["steps"]:
        span = range(g["first"], g["first"] + max(1, g["n_steps"]))
        out.append({**g, "energy_j": g["energy_j"] + sum(r.get(s, 0.0) for r in energy for s in span),
                    "tokens": g["tokens"] + round(sum(r.get(s, 0.0) for r in tokens for s in span))})
    return out


def build_document(parts: list[dict], cfg: EnergyConfig, *, run_id: str, flops_per_token: float | None = None,
                   extra: dict[str, Any] | None = None) -> dict:
    """Merge per-rank parts (see ``EnergyMonitor.local_part``) into the energy.json document.

    Node-level devices (RAPL packages, DRAM) appear in the part of one rank per node
    only; should two ranks of a node both report one, the second is dropped and
    listed under ``dropped_duplicates``, so a job's total never scales with its rank count.
    """
    devices, dropped = _dedupe_devices(parts)
    counted = [d for d in devices if d["counted"]]
    checks = [d for d in devices if not d["counted"]]
    it_j = sum(d["energy_j"] for d in counted)
    measured_j = sum(d["energy_j"] for d in counted if not d["estimated"])
    estimated_j = it_j - measured_j
    unc_j = sum(d["energy_j"] * d["uncertainty_rel"] for d in counted)

    by_source: dict[str, dict] = {}
    by_rank: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, float] = collections.defaultdict(float)
    for d in counted:
        s = by_source.setdefault(d["source"], {"energy_j": 0.0, "estimated": d["estimated"],
                                               "integrated": d["integrated"]})
        s["energy_j"] += d["energy_j"]
        by_rank[str(d["rank"])] += d["energy_j"]
        by_node[d["node"]] += d["energy_j"]

    keep = {(d["rank"], d["key"]) for d in counted}
    stages: dict[str, dict] = {}
    for p in parts:
        for stage, per in p["stages"].items():
            st = stages.setdefault(stage, {"energy_j": 0.0, "measured_j": 0.0, "estimated_j": 0.0, "duration_s": 0.0,
                                           "by_source": {}})
            st["duration_s"] = max(st["duration_s"], p["stage_time_s"].get(stage, 0.0))
            for d in p["devices"]:
                if (p["rank"], d["key"]) not in keep:
                    continue
                j = per.get(d["key"], 0.0)
                st["energy_j"] += j
                st["estimated_j" if d["estimated"] else "measured_j"] += j
                st["by_source"][d["source"]] = st["by_source"].get(d["source"], 0.0) + j

    cross = []
    for c in checks:
        ref = next((d for d in counted if d["rank"] == c["rank"] and d["device"] == c["device"]), None)
        if ref is not None:
            cross.append({"rank": c["rank"], "node": c["node"], "device": c["device"], "source": c["source"],
                          "energy_j": c["energy_j"], "reference_source": ref["source"],
                          "reference_j": ref["energy_j"],
                          "diff_rel": (c["energy_j"] - ref["energy_j"]) / ref["energy_j"] if ref["energy_j"] else None})

    grid = grid_intensity(cfg)
    tokens = sum(p["tokens"] for p in parts)
    steps = max((p["steps_done"] for p in parts), default=0)
    flops = flops_per_token * tokens if flops_per_token and tokens else None
    facility_j = it_j * cfg.pue
    totals = {
        "it_energy_j": it_j, "facility_energy_j": facility_j, "it_kwh": it_j / J_PER_KWH,
        "facility_kwh": facility_j / J_PER_KWH, "measured_j": measured_j, "estimated_j": estimated_j,
        "coverage_measured": measured_j / it_j if it_j else 0.0, "uncertainty_j": unc_j,
        "energy_low_j": it_j - unc_j, "energy_high_j": it_j + unc_j,
        "carbon_g": carbon_g(it_j, cfg.pue, grid["gco2_per_kwh"]),
        "carbon_low_g": carbon_g(it_j - unc_j, cfg.pue, grid["gco2_per_kwh"]),
        "carbon_high_g": carbon_g(it_j + unc_j, cfg.pue, grid["gco2_per_kwh"]),
        "tokens": tokens, "steps": steps,
        "j_per_token": it_j / tokens if tokens else None,
        "tokens_per_kwh": tokens / (it_j / J_PER_KWH) if it_j else None,
        "flops": flops, "flops_per_token": flops_per_token, "j_per_flop": it_j / flops if flops else None,
        "estimated": estimated_j > 0, "measured": measured_j > 0,
    }
    base = sorted(parts, key=lambda p: p["rank"])[0]
    series = {}
    for p in parts:
        for key, watts in p["power"]["series"].items():
            series[f"rank{p['rank']}/{key}"] = watts
    doc = {
        "schema": SCHEMA, "run_id": run_id, "started_at": base["started_at"],
        "started_unix_s": base.get("started_unix_s"), "duration_s": max(p["duration_s"] for p in parts),
        "world_size": len(parts), "nodes": sorted({p["node"] for p in parts}),
        "config": {"pue": cfg.pue, "sample_hz": cfg.sample_hz, "grid_region": cfg.grid_region,
                   "grid_gco2_per_kwh": cfg.grid_gco2_per_kwh},
        "totals": totals,
        "carbon": {**grid, "pue": cfg.pue},
        "by_source": by_source, "by_rank": dict(by_rank), "by_node": dict(by_node), "stages": stages,
        "devices": counted, "cross_checks": cross, "dropped_duplicates": dropped,
        "unavailable": [{**u, "rank": p["rank"], "node": p["node"]} for p in parts for u in p["unavailable"]],
        "windows": [{**w, "rank": p["rank"]} for p in parts for w in p["windows"]],
        "steps": _merge_steps(parts),
        "power": {"bin_s": base["power"]["bin_s"], "series": series},
        "overhead": {"sampler_cpu_s": sum(p["overhead_s"] for p in parts),
                     "by_rank": {str(p["rank"]): p["overhead_s"] for p in parts}},
        "comparisons": comparisons(facility_j, tokens, flops),
    }
    if extra:
        doc.update(extra)
    return doc
