"""The curated demo corpus the training benchmarks run on when no ``--data`` is given."""

from __future__ import annotations


def demo_dataset(tmp: str, n: int) -> str:
    """Synthesize ``n`` image-caption items under ``tmp`` and curate them with the demo data config."""
    from m6.config import preset
    from m6.data.curate import curate
    from m6.data.synth import synthesize

    synthesize(f"{tmp}/raw", n=n, seed=0, langs=["en", "zh"])
    curate([f"{tmp}/raw"], f"{tmp}/ds", preset("demo").data)
    return f"{tmp}/ds"
