"""MoE health over a whole evaluation: per-layer expert load, coefficient of variation, drop rate, router entropy."""

from __future__ import annotations

import math

import numpy as np


class MoEHealth:
    """Accumulates the model's per-forward ``moe_stats()`` into per-layer totals.

    A single batch's load CV is noisy; summing routed-token counts over the whole
    eval set measures the router the way serving traffic would see it (the
    imbalance Switch Transformer's auxiliary loss targets, arXiv 2101.03961).
    """

    def __init__(self) -> None:
        self.layers: dict[int, dict] = {}

    def add(self, stats: list[dict]) -> None:
        """Fold in one forward's ``model.moe_stats()`` (one dict per MoE layer)."""
        for i, s in enumerate(stats):
            layer = int(s.get("layer", i))
            counts = np.asarray(s["tokens_per_expert"], dtype=np.int64)
            acc = self.layers.setdefault(layer, {"counts": np.zeros_like(counts), "dropped": 0, "assignments": 0,
                                                 "entropy_sum": 0.0, "tokens": 0})
            acc["counts"] += counts
            acc["dropped"] += int(s.get("dropped", 0))
            tokens = int(s.get("tokens", counts.sum()))
            acc["assignments"] += int(s.get("assignments", counts.sum()))
            # token-weighted mean of the router's mean entropy per forward
            acc["entropy_sum"] += float(s.get("router_entropy", 0.0)) * tokens
            acc["tokens"] += tokens

    def summary(self) -> list[dict]:
        """Per layer: ``tokens_per_expert``, ``load_share``, ``load_cv``, ``drop_rate``, ``router_entropy`` (nats)
        and ``router_entropy_max`` (log E, the uniform router)."""
        out = []
        for layer in sorted(self.layers):
            a = self.layers[layer]
            c = a["counts"].astype(np.float64)
            mean = c.mean() if c.size else 0.0
            out.append({
                "layer": layer,
                "tokens_per_expert": a["counts"].tolist(),
                "load_share": (c / c.sum()).tolist() if c.sum() > 0 else [0.0] * c.size,
                "load_cv": float(c.std() / mean) if mean > 0 else 0.0,
                "drop_rate": a["dropped"] / a["assignments"] if a["assignments"] else 0.0,
                "router_entropy": a["entropy_sum"] / a["tokens"] if a["tokens"] else 0.0,
                "router_entropy_max": math.log(c.size) if c.size else 0.0,
                "tokens": a["tokens"],
            })
        return out


def overall(layers: list[dict]) -> dict[str, float]:
    """Mean over MoE layers of load CV, drop rate and router entropy (the gate's guarded scalars)."""
    if not layers:
        return {}
    return {k: float(np.mean([lay[k] for lay in layers])) for k in ("load_cv", "drop_rate", "router_entropy")}
