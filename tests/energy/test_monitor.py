"""EnergyMonitor: windows and steps add up, stages partition the run, ranks merge without double counting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m6.config import EnergyConfig
from m6.energy.monitor import EnergyMonitor
from m6.energy.nvml import open_gpu_sensors
from m6.energy.rapl import discover_rapl
from m6.energy.summary import build_document

from .fakes import FakeRapl, fake_nvml, free_port

HERE = Path(__file__).resolve().parent


def _work(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(500))


@pytest.fixture
def rapl(tmp_path):
    fake = FakeRapl(tmp_path / "powercap").start()
    yield fake
    fake.stop()


def test_per_step_figures_add_up_to_the_window_total(rapl):
    nv = fake_nvml(1)
    sensors = open_gpu_sensors(0, nvml=nv) + discover_rapl(rapl.root)
    mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="steps", sensors=sensors).start()
    with mon.window("train"):
        for step in range(40):
            _work(0.012 if step % 3 else 0.04)  # short, uneven steps: shorter than the counter's 100 ms refresh
            mon.step(step, 512)
    doc = mon.stop()
    (train,) = [w for w in doc["windows"] if w["stage"] == "train"]
    steps_j = sum(g["energy_j"] for g in doc["steps"])
    assert steps_j == pytest.approx(train["energy_j"], rel=0.005)
    assert sum(g["n_steps"] for g in doc["steps"]) == 40 and sum(g["tokens"] for g in doc["steps"]) == 40 * 512
    assert [g["first"] for g in doc["steps"]] == sorted(g["first"] for g in doc["steps"])
    # Short steps are batched: every group but the last spans at least the counter's refresh period.
    assert all(g["t1_s"] - g["t0_s"] >= 0.1 for g in doc["steps"][:-1]) and len(doc["steps"]) < 40
    t0, t1 = mon.t0_s + train["t0_s"], mon.t0_s + train["t1_s"]
    truth = nv.gpus[0].profile.energy_j(t1) - nv.gpus[0].profile.energy_j(t0) + rapl.counted_energy_j(t0, t1)
    # The counter moves every 100 ms while the draw changes every 50 ms, so each window edge is known only to
    # the draw's swing over a quarter refresh (linear interpolation) plus the peak draw over the ~1/8 refresh
    # within which the monitor dates an update: about 8 J per edge here, ~5 % of a ~1-s window.
    gpu = nv.gpus[0]
    edge_j = gpu.profile.swing_w * gpu.refresh_s / 4 + (gpu.profile.base_w + gpu.profile.swing_w) * gpu.refresh_s / 8
    assert abs(train["energy_j"] - truth) <= 2 * edge_j


def test_nested_windows_attribute_energy_to_the_innermost_and_stages_partition_the_run(rapl):
    mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="stages", sensors=discover_rapl(rapl.root)).start()
    with mon.window("train"):
        for step in range(6):
            _work(0.03)
            mon.step(step, 10)
        with mon.window("eval"):
            time.sleep(0.25)
        for step in range(6, 9):
            _work(0.03)
            mon.step(step, 10)
    time.sleep(0.1)
    doc = mon.stop()
    stages = doc["stages"]
    assert set(stages) >= {"train", "eval"}
    assert sum(s["energy_j"] for s in stages.values()) == pytest.approx(doc["totals"]["it_energy_j"], rel=1e-9)
    eval_w = next(w for w in doc["windows"] if w["stage"] == "eval")
    train_w = next(w for w in doc["windows"] if w["stage"] == "train")
    assert stages["eval"]["energy_j"] == pytest.approx(eval_w["energy_j"], rel=1e-9)
    assert stages["train"]["energy_j"] == pytest.approx(train_w["energy_j"] - eval_w["energy_j"], rel=1e-9)
    # RAPL zones draw 86 W in total: 0.25 s of eval is ~21 J. The double's writer thread shares the GIL with
    # the busy steps, so its files can trail by tens of ms on a loaded host: allow 100 ms of staleness.
    assert abs(eval_w["energy_j"] - 86 * (eval_w["t1_s"] - eval_w["t0_s"])) <= 86 * 0.1
    # Steps after the eval window start at its end, so the eval energy is no step's.
    steps_j = sum(g["energy_j"] for g in doc["steps"])
    assert steps_j == pytest.approx(train_w["energy_j"] - eval_w["energy_j"], rel=0.02)


def test_end_of_a_window_that_is_not_open_names_it():
    mon = EnergyMonitor(EnergyConfig(), run_id="x").start()
    mon.begin("train")
    with pytest.raises(ValueError, match=r"end\('eval'\): no open window.*'train'"):
        mon.end("eval")
    mon.end("train")
    mon.stop()


def test_unknown_grid_region_fails_before_the_run():
    from m6.config import ConfigError

    with pytest.raises(ConfigError, match="energy.grid_region: unknown region 'mars'"):
        EnergyMonitor(EnergyConfig(grid_region="mars"), run_id="x")


def test_node_level_device_reported_by_two_ranks_counts_once():
    def part(rank: int) -> dict:
        dev = {"device": "cpu-package-0", "source": "rapl", "scope": "node", "estimated": False, "integrated": False,
               "counted": True, "uncertainty_rel": 0.1, "key": "cpu-package-0:rapl", "energy_j": 100.0}
        gpu = {**dev, "device": f"gpu{rank}", "source": "nvml_energy", "scope": "rank", "key": f"gpu{rank}:nvml_energy",
               "energy_j": 50.0, "uncertainty_rel": 0.05}
        return {"rank": rank, "node": "n1", "started_at": "", "duration_s": 1.0, "devices": [dev, gpu],
                "stages": {"train": {dev["key"]: 100.0, gpu["key"]: 50.0}}, "stage_time_s": {"train": 1.0},
                "windows": [], "steps": [], "tokens": 10, "steps_done": 1, "power": {"bin_s": 1.0, "series": {}},
                "unavailable": [], "overhead_s": 0.0}

    doc = build_document([part(0), part(1)], EnergyConfig(), run_id="dup")
    assert doc["totals"]["it_energy_j"] == 200.0  # 100 (node, once) + 2 × 50 (one GPU per rank)
    assert doc["stages"]["train"]["energy_j"] == 200.0
    assert [d["rank"] for d in doc["dropped_duplicates"]] == [1]


def test_two_process_job_reports_each_gpu_and_node_sensors_once(rapl, tmp_path):
    epoch = time.monotonic() - 1.0
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(rapl.root), repr(epoch),
                                       str(tmp_path)], env=env))
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r1["kept_sensors"] == ["gpu1:nvml_energy", "gpu1:nvml_power"]  # rank 1 dropped the node's RAPL zones
    doc = r0["doc"]
    assert doc == r1["doc"]  # every rank returns the merged document
    counted = sorted(d["device"] for d in doc["devices"])
    assert counted == ["cpu-package-0", "cpu-package-1", "dram-0", "gpu0", "gpu1"]
    assert doc["world_size"] == 2 and doc["dropped_duplicates"] == []
    nv = fake_nvml(2, epoch_s=epoch)
    gpu_truth = sum(nv.gpus[r].profile.energy_j(x["t1_s"]) - nv.gpus[r].profile.energy_j(x["t0_s"])
                    for r, x in enumerate((r0, r1)))
    truth = gpu_truth + rapl.counted_energy_j(r0["t0_s"], r0["t1_s"])
    assert doc["totals"]["it_energy_j"] == pytest.approx(truth, rel=0.03)
    assert doc["by_rank"]["1"] == pytest.approx(
        nv.gpus[1].profile.energy_j(r1["t1_s"]) - nv.gpus[1].profile.energy_j(r1["t0_s"]), rel=0.03)
    assert doc["totals"]["tokens"] == 2 * 12 * 1000
    # The running figure, reduced across ranks at a log interval, trails the final one by the sensors'
    # lag (the 1-s power average of the cross-check sensor holds the horizon ~0.5 s back) and never exceeds it.
    assert r0["running"] == r1["running"]
    assert 0 < r0["running"]["tokens"] <= 24000
    assert 0.5 * doc["totals"]["it_energy_j"] < r0["running"]["energy_j"] <= doc["totals"]["it_energy_j"]


def test_step_groups_merge_pairwise_past_the_cap_and_keep_their_sums(monkeypatch):
    from m6.energy import ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "MAX_STEP_GROUPS", 4)
    led = ledger_mod.Ledger(lags_s=[0.0], counted=[True], min_window_s=0.1, t0_s=0.0)
    led.add_sample(0.0, [0.0])
    for k in range(1, 40):  # 40 W steady; one step per 0.1 s
        led.add_event(ledger_mod.Event(k * 0.1, ledger_mod.STEP, step=k, tokens=7))
        led.add_sample(k * 0.1 + 0.05, [40.0 * (k * 0.1 + 0.05)])
    led.finish(3.95)
    assert len(led.groups) <= 8
    assert sum(g["n_steps"] for g in led.groups) == 39 and sum(g["tokens"] for g in led.groups) == 39 * 7
    assert sum(g["energy_j"] for g in led.groups) == pytest.approx(40.0 * (3.9 - 0.0), rel=1e-9)
    assert all(a["last"] + 1 == b["first"] for a, b in zip(led.groups, led.groups[1:]))


def test_stepped_counter_updates_are_dated_between_polls_so_windows_match_the_truth():
    from m6.energy import ledger as ledger_mod

    # A counter that advances every 100 ms (phase 37 ms) at 300 W, polled every 25 ms; no threads, no clock.
    def counter_j(t: float) -> float:
        return 300.0 * (((t - 0.037) // 0.1) * 0.1 + 0.037)

    led = ledger_mod.Ledger(lags_s=[0.1], counted=[True], min_window_s=0.1, t0_s=1.0, stepped_s=[0.1])
    led.add_event(ledger_mod.Event(1.23, ledger_mod.BEGIN, stage="w"))
    led.add_event(ledger_mod.Event(1.81, ledger_mod.END, stage="w"))
    led.stop_s = 2.0  # as EnergyMonitor.stop sets it before its last polls
    t = 1.0
    while t < 2.2:
        led.add_sample(t, [counter_j(t)])
        t += 0.025
    led.finish(2.0)
    (w,) = led.windows
    assert w["energy_j"] == pytest.approx(300.0 * 0.58, abs=300.0 * 0.0125 * 2)  # within 1/8 period per edge
    assert led.total_j() == pytest.approx(300.0 * 1.0, abs=300.0 * 0.0125 * 2)
