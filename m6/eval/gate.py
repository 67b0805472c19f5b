"""The deployment gate: promote a candidate only if it clears thresholds and beats the champion.

Rules, in order (each check is recorded, so the report shows why):

1. every configured threshold is cleared (a minimum, or a maximum for
   lower-is-better metrics); a metric the candidate lacks fails its threshold;
2. with no champion, a model that clears the thresholds is promoted ("first model");
3. no guarded metric regresses beyond its tolerance, a fraction of the champion's value;
4. the primary metric improves on the champion's by more than ``min_improvement``.
"""

from __future__ import annotations

import math
from typing import Any

from m6.config import EvalConfig


def flat_metrics(doc: dict) -> dict[str, float]:
    """``eval.json``'s metrics (``{name: {"value": v, …}}``) or a plain ``{name: v}`` map as ``{name: v}``."""
    metrics = doc.get("metrics", doc)
    out = {}
    for name, v in metrics.items():
        value = v.get("value") if isinstance(v, dict) else v
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def lower_is_better(name: str, cfg: EvalConfig) -> bool:
    """True for metrics (by name suffix, e.g. perplexity) where a smaller value is better."""
    return any(name.endswith(s) for s in cfg.lower_is_better)


def _threshold_checks(cand: dict[str, float], cfg: EvalConfig) -> list[dict]:
    checks = []
    for name, bound in sorted(cfg.thresholds.items()):
        value = cand.get(name)
        low = lower_is_better(name, cfg)
        ok = value is not None and not math.isnan(value) and (value <= bound if low else value >= bound)
        checks.append({"check": "threshold", "metric": name, "value": value, "bound": bound,
                       "direction": "max" if low else "min", "passed": bool(ok)})
    return checks


def _guard_checks(cand: dict[str, float], champ: dict[str, float], cfg: EvalConfig) -> list[dict]:
    checks = []
    for name, tol in sorted(cfg.guarded.items()):
        c, ch = cand.get(name), champ.get(name)
        if ch is None or math.isnan(ch):
            # the champion never measured it: nothing to regress from
            checks.append({"check": "guard", "metric": name, "value": c, "champion": ch, "passed": True,
                           "note": "champion has no value"})
            continue
        allowed = tol * abs(ch)
        low = lower_is_better(name, cfg)
        if c is None or math.isnan(c):
            ok, regression = False, None
        else:
            regression = (c - ch) if low else (ch - c)
            ok = regression <= allowed
        checks.append({"check": "guard", "metric": name, "value": c, "champion": ch, "regression": regression,
                       "allowed": allowed, "passed": bool(ok)})
    return checks


def decide(candidate: dict, champion: dict | None, cfg: EvalConfig) -> dict[str, Any]:
    """Promote or hold the candidate.

    Args:
        candidate: the candidate's ``eval.json`` document (or a flat metric map).
        champion: the serving model's ``eval.json``, or None when nothing is deployed yet.
        cfg: thresholds, guarded metrics with tolerances, primary metric.

    Returns:
        ``{"decision": "promote"|"hold", "reason": str, "first_model": bool,
        "primary_metric", "checks": [...], "comparable": bool|None}``.
    """
    cand = flat_metrics(candidate)
    checks = _threshold_checks(cand, cfg)
    failed = [c for c in checks if not c["passed"]]
    out: dict[str, Any] = {"primary_metric": cfg.primary_metric, "first_model": champion is None, "checks": checks,
                           "comparable": None}

    def finish(decision: str, reason: str) -> dict[str, Any]:
        out.update(decision=decision, reason=reason)
        return out

    if failed:
        what = "; ".join(f"{c['metric']}={_fmt(c['value'])} does not clear the {c['direction']} {c['bound']:g}"
                         for c in failed)
        return finish("hold", f"threshold not met: {what}")
    if champion is None:
        return finish("promote", "first model: no champion deployed and every threshold is cleared")

    champ = flat_metrics(champion)
    out["comparable"] = same_eval_data(candidate, champion)
    guards = _guard_checks(cand, champ, cfg)
    checks.extend(guards)
    regressed = [g for g in guards if not g["passed"]]
    if regressed:
        what = "; ".join(f"{g['metric']} {_fmt(g['champion'])} → {_fmt(g['value'])} (tolerance {_fmt(g['allowed'])})"
                         for g in regressed)
        return finish("hold", f"guarded metric regressed: {what}")

    p, pc = cand.get(cfg.primary_metric), champ.get(cfg.primary_metric)
    low = lower_is_better(cfg.primary_metric, cfg)
    if p is None or math.isnan(p):
        improved, gain = False, None
    elif pc is None or math.isnan(pc):
        improved, gain = True, None
    else:
        gain = (pc - p) if low else (p - pc)
        improved = gain > cfg.min_improvement
    checks.append({"check": "primary", "metric": cfg.primary_metric, "value": p, "champion": pc, "gain": gain,
                   "min_improvement": cfg.min_improvement, "passed": bool(improved)})
    note = "" if out["comparable"] is not False else " (note: champion was evaluated on different data)"
    if not improved:
        return finish("hold", f"primary metric {cfg.primary_metric} did not improve: champion {_fmt(pc)}, "
                              f"candidate {_fmt(p)} (needs a gain > {cfg.min_improvement:g}){note}")
    return finish("promote", f"{cfg.primary_metric} improved {_fmt(pc)} → {_fmt(p)} and no guarded metric "
                             f"regressed beyond tolerance{note}")


def same_eval_data(a: dict, b: dict) -> bool | None:
    """True when two eval documents were computed on the same dataset fingerprint and split; None if unknown."""
    da, db = a.get("data"), b.get("data")
    if not isinstance(da, dict) or not isinstance(db, dict):
        return None
    keys = ("manifest_sha256", "split")
    return all(da.get(k) == db.get(k) for k in keys)


def _fmt(v: float | None) -> str:
    return "missing" if v is None else f"{v:.4g}"
