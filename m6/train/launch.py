"""Start training: N local processes (torchrun-style, logs streamed by rank) or a TrainJob on a cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any

from m6 import storage
from m6.config import Config
from m6.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, rank: int, tail: deque, sink) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        tail.append(line)
        print(f"[rank {rank}] {line}", file=sink, flush=True)


def spawn(cfg: Config, data_uri: str, out_uri: str, *, nproc: int, resume: str | None = None,
          metrics_port: int | None = None, log_sink=None, env: dict[str, str] | None = None,
          worker_cmd: list[str] | None = None) -> list[subprocess.Popen]:
    """Start ``nproc`` rank processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set; returns them.

    ``worker_cmd`` replaces ``python -m m6.train.worker`` (the program each rank runs; it gets
    ``--config --data --out`` arguments), e.g. for a benchmark that swaps a model component.
    """
    cfg_file = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="m6-train-", delete=False)
    json.dump(cfg.to_dict(), cfg_file)
    cfg_file.close()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for r in range(nproc):
        e = {**os.environ, **(env or {}), "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r),
             "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        cmd = [*(worker_cmd or [sys.executable, "-m", "m6.train.worker"]), "--config", cfg_file.name, "--data", data_uri,
               "--out", out_uri]
        if resume:
            cmd += ["--resume", resume]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e)
        p.tail = deque(maxlen=40)  # type: ignore[attr-defined]
        threading.Thread(target=_pump, args=(p.stdout, r, p.tail, log_sink or sys.stderr), daemon=True).start()
        procs.append(p)
    return procs


def supervise(procs: list[subprocess.Popen], *, timeout_s: float | None = None, grace_s: float = 30.0) -> None:
    """Wait for all ranks; when one fails, stop the rest (SIGTERM, then SIGKILL) and raise its error."""
    t0 = time.monotonic()
    forwarded = False

    def forward(signum, frame):
        nonlocal forwarded
        forwarded = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed or (timeout_s is not None and time.monotonic() - t0 > timeout_s):
                _stop_all(procs, grace_s)
                if failed:
                    r, c = failed[0]
                    tail = "\n".join(list(procs[r].tail)[-15:])  # type: ignore[attr-defined]
                    raise UserError(f"training rank {r} exited with code {c}; the other ranks were stopped. "
                                    f"Last lines of rank {r}:\n{tail}")
                raise UserError(f"training did not finish within {timeout_s:.0f} s; all ranks were stopped")
            if all(c == 0 for c in codes):
                return
            time.sleep(0.2)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def train(cfg: Config, data_uri: str, out_uri: str, nproc: int = 1, *, resume: str | None = None,
          metrics_port: int | None = None, timeout_s: float | None = None, log_sink=None,
          worker_cmd: list[str] | None = None) -> dict[str, Any]:
    """Train locally with ``nproc`` processes (gloo on the CPU, NCCL on GPUs); returns the run summary.

    Raises:
        UserError: when a rank fails (its last log lines included) or the data is missing.
    """
    if nproc < 1:
        raise UserError("--nproc must be >= 1")
    if not storage.exists(storage.join(data_uri, "manifest.json")):
        raise UserError(f"{data_uri}: no manifest.json; run `m6 curate` first")
    procs = spawn(cfg, data_uri, out_uri, nproc=nproc, resume=resume, metrics_port=metrics_port, log_sink=log_sink,
                  worker_cmd=worker_cmd)
    supervise(procs, timeout_s=timeout_s)
    return storage.read_json(storage.join(out_uri, "train_summary.json"))


def submit_trainjob(cfg: Config, data_uri: str, out_uri: str, *, name: str, image: str, nodes: int = 1,
                    gpus_per_node: int = 1, namespace: str = "default", extra_args: list[str] | None = None,
                    dry_run: bool = False, timeout_s: float = 7 * 86400, **spec_kw: Any) -> dict[str, Any]:
    """Build (and unless ``dry_run`` submit and follow) the TrainJob that runs this config on a cluster."""
    from m6.train.trainjob import JobSpec, build_trainjob, submit, validate_trainjob

    args = ["--preset", cfg.preset, "--config-json", json.dumps(cfg.to_dict()), "--data", data_uri, "--out", out_uri,
            "--resume", "auto", *(extra_args or [])]
    obj = build_trainjob(JobSpec(name=name, image=image, args=args, namespace=namespace, num_nodes=nodes,
                                 gpus_per_node=gpus_per_node, **spec_kw))
    validate_trainjob(obj)
    if dry_run:
        return {"trainjob": obj, "submitted": False}
    return {"trainjob": obj, "submitted": True, **submit(obj, timeout_s=timeout_s)}
