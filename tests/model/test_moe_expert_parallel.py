"""Expert parallelism over two real gloo processes: sharded layer == single-process layer (outputs, gradients)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

CASES = [
    {"num_experts": 4, "top_k": 1},
    {"num_experts": 4, "top_k": 2, "capacity_factor": 0.75},
    {"num_experts": 8, "num_prototypes": 2},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_expert_parallel_layer_equals_single_process_layer():
    worker = Path(__file__).with_name("ep_worker.py")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(worker), json.dumps(CASES)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for o in outs:
        for case, res in zip(CASES, o["results"]):
            for key in ("y", "x_grad", "w1_grad", "w2_grad", "router_grad"):
                assert res[key] < 1e-5, f"rank {o['rank']} case {case}: {key} differs by {res[key]}"
            assert res["group_name"] == "ep_size_2"
    assert sum(o["results"][1]["dropped"] for o in outs) > 0, "the capacity case should drop tokens"
