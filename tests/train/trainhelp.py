"""Helpers for training tests: a tiny-config builder and per-step loss readers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from m6.config import Config, preset


def tiny(**train: object) -> Config:
    """The tiny preset with training overrides and energy measurement off (tests time it elsewhere)."""
    c = preset("tiny")
    c.train = dataclasses.replace(c.train, **train)
    c.energy = dataclasses.replace(c.energy, enabled=False)
    return c


def step_losses(out: Path | str, rank: int = 0) -> dict[int, dict[str, float]]:
    """Per-step losses a rank recorded, merged over all (resumed) segments of the run."""
    rows: dict[int, dict[str, float]] = {}
    for f in sorted(Path(out, "losses").glob(f"losses-rank{rank}-from*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            rows[r.pop("step")] = r
    return rows


def window_mean(losses: dict[int, dict[str, float]], steps: range, objective: str) -> float:
    vals = [r[objective] for s, r in losses.items() if s in steps and objective in r]
    assert vals, f"no {objective} steps in {steps}"
    return sum(vals) / len(vals)
