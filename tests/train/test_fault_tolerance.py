"""Kill tests: a rank SIGKILLed mid-training and mid-checkpoint-write; the rerun resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from m6.errors import UserError
from m6.train.checkpoint import latest_complete, list_checkpoints
from m6.train.launch import spawn, supervise, train

from trainhelp import step_losses, tiny

STEPS = 20


def _cfg():
    return tiny(steps=STEPS, ep_size=2, zero_stage=2, save_every=4, log_every=4, keep_last=2)


def _wait(cond, procs, timeout_s=240.0, poll_s=0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        assert all(p.poll() is None for p in procs), "a rank ended early"
        time.sleep(poll_s)


def _catch_partial(root: Path, procs) -> int:
    """Freeze rank 0 (the only writer of COMPLETE) the moment a checkpoint folder appears
    and before its COMPLETE exists; return that step. Retries on the next checkpoint if missed."""
    seen_complete = {s for s, _, c in list_checkpoints(str(root)) if c}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert procs[0].poll() is None, "rank 0 ended before a partial checkpoint could be caught"
        for s in range(4, STEPS + 1, 4):
            d = root / f"step-{s:08d}"
            if s not in seen_complete and d.exists():
                os.kill(procs[0].pid, signal.SIGSTOP)
                if not (d / "COMPLETE").exists():
                    return s
                seen_complete.add(s)  # too late for this one: let it finish, try the next
                os.kill(procs[0].pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("no checkpoint write caught in progress")


def test_killed_runs_resume_from_complete_checkpoints_with_identical_losses(corpus, tmp_path):
    ref = tmp_path / "ref"
    train(_cfg(), corpus, str(ref), nproc=2, log_sink=open(tmp_path / "ref.log", "w"))
    expected = step_losses(ref)
    assert len(expected) == STEPS

    out = tmp_path / "run"
    root = out / "checkpoints"
    # 1. SIGKILL rank 1 between checkpoints.
    procs = spawn(_cfg(), corpus, str(out), nproc=2, log_sink=open(tmp_path / "a.log", "w"))
    _wait(lambda: (latest_complete(str(root)) or "").endswith("step-00000008"), procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    with pytest.raises(UserError, match="rank 1 exited with code -9"):
        supervise(procs, grace_s=5)
    first_resume = latest_complete(str(root))
    assert first_resume is not None and int(first_resume[-8:]) >= 8

    # 2. Resume, then SIGKILL rank 0 in the middle of writing a checkpoint.
    procs = spawn(_cfg(), corpus, str(out), nproc=2, resume="auto", log_sink=open(tmp_path / "b.log", "w"))
    partial_step = _catch_partial(root, procs)
    os.kill(procs[0].pid, signal.SIGKILL)
    with pytest.raises(UserError, match="exited with code -9"):
        supervise(procs, grace_s=5)
    partial = root / f"step-{partial_step:08d}"
    assert partial.exists() and not (partial / "COMPLETE").exists()
    newest = latest_complete(str(root))
    assert newest is not None and int(newest[-8:]) < partial_step, "a partial checkpoint is never chosen"

    # 3. Resume to the end: from the newest complete checkpoint, with the uninterrupted run's losses.
    s = train(_cfg(), corpus, str(out), nproc=2, resume="auto", log_sink=open(tmp_path / "c.log", "w"))
    assert s["resumed_from"] == newest and s["start_step"] == int(newest[-8:])
    got = step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for obj, v in expected[step].items():
            assert got[step][obj] == pytest.approx(v, rel=1e-5, abs=1e-6), f"step {step} {obj}"
    assert not partial.exists() or (partial / "COMPLETE").exists(), "the abandoned partial write was replaced"


def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "pre"
    procs = spawn(_cfg(), corpus, str(out), nproc=2, log_sink=open(tmp_path / "p.log", "w"))
    _wait(lambda: latest_complete(str(out / "checkpoints")) is not None, procs)
    for p in procs:  # what a Kubernetes eviction does to every pod of the job
        os.kill(p.pid, signal.SIGTERM)
    supervise(procs)
    s = json.loads((out / "train_summary.json").read_text())
    assert s["stopped_early"] and s["steps"] < STEPS
    assert s["checkpoint"] == latest_complete(str(out / "checkpoints"))
    assert s["checkpoint"].endswith(f"step-{s['steps']:08d}")
