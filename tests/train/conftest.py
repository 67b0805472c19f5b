"""Shared fixtures for training tests: one small curated corpus and a tiny-config runner."""

from __future__ import annotations

import pytest

from m6.config import preset


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
