"""The MoE benchmark runs end to end at toy size, and our layer's output equals DeepSpeed's MoE on identical routing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_benchmark_runs_and_matches_deepspeed_moe_outputs(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "moe_bench.py"), "--tokens", "512", "--d-model", "32",
                           "--d-ff", "64", "--experts", "4,8", "--top2-experts", "4", "--reps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = [float(d) for d in re.findall(r"vs ours: max \|Δy\| = (\S+)", proc.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, proc.stdout
    result = json.loads(out.read_text())
    names = {r["variant"] for r in result["rows"]}
    assert {"m6 E=4 top1", "deepspeed dropless E=8 top1", "naive loop E=4 top2", "dense 2T rows"} <= names
    assert all(r["ms"] > 0 and r["x_dense"] > 0 for r in result["rows"])
    assert out.with_suffix(".png").stat().st_size > 0
