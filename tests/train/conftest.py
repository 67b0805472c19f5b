"""Shared fixtures for training tests: one small curated corpus and a tiny-config runner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from m6.config import Config, preset


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A curated dataset (images + texts, en + zh) of ~400 samples in 3 shards, made once per session."""
    from m6.data.curate import curate
    from m6.data.synth import synthesize

    root = tmp_path_factory.mktemp("corpus")
    synthesize(str(root / "raw"), n=400, seed=0, langs=["en", "zh"])
    cfg = preset("tiny").data
    curate([str(root / "raw")], str(root / "ds"), cfg)
    return str(root / "ds")


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
