"""Sensors against hardware doubles: counters that wrap and reset, missing and forbidden sensors."""

from __future__ import annotations

import time

import pytest

from m6.config import EnergyConfig
from m6.energy import rapl as rapl_mod
from m6.energy.monitor import EnergyMonitor, discover_sensors
from m6.energy.nvml import NvmlEnergyCounter, NvmlPowerIntegrator, open_gpu_sensors
from m6.energy.rapl import discover_rapl
from m6.energy.sensors import CounterTracker, CpuTimeEstimate, SensorUnavailable, cpu_watts_per_thread

from .fakes import FakeRapl, fake_nvml


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(2000))


def test_counter_tracker_counts_a_wrap_as_the_energy_across_the_wrap():
    t = CounterTracker(unit_j=1e-6, max_raw=1_000_000, max_power_w=1000)
    assert t.update(900_000, 0.0) == 0.0
    assert t.update(950_000, 0.1) == pytest.approx(0.05)
    assert t.update(30_000, 0.2) == pytest.approx(0.08)  # 50_000 to the top, 30_000 after it
    assert (t.wraps, t.resets) == (1, 0)


def test_counter_tracker_treats_an_implausible_backwards_step_as_a_reset():
    t = CounterTracker(unit_j=1e-3, max_raw=None, max_power_w=1000)
    t.update(5_000_000, 0.0)
    assert t.update(5_020_000, 0.1) == pytest.approx(20.0)
    assert t.update(7_000, 0.2) == pytest.approx(7.0)  # energy since the counter restarted at zero
    assert (t.wraps, t.resets) == (0, 1)
    ranged = CounterTracker(unit_j=1e-6, max_raw=10**12, max_power_w=1000)
    ranged.update(5 * 10**11, 0.0)
    assert ranged.update(1_000, 0.1) == pytest.approx(1e-3)  # wrapping would mean 500 kJ in 0.1 s: a reset
    assert ranged.resets == 1


def test_rapl_reads_packages_and_dram_only_and_survives_wraps(tmp_path):
    fake = FakeRapl(tmp_path / "powercap").start()
    try:
        zones = discover_rapl(fake.root)
        assert sorted(z.device for z in zones) == ["cpu-package-0", "cpu-package-1", "dram-0"]
        assert all(z.scope == "node" and not z.estimated for z in zones)
        mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="rapl", sensors=zones).start()
        time.sleep(1.5)
        doc = mon.stop()
    finally:
        fake.stop()
    truth = fake.counted_energy_j(mon.t0_s, mon.t1_s)
    assert doc["totals"]["it_energy_j"] == pytest.approx(truth, rel=0.04)
    assert sum(d["wraps"] for d in doc["devices"]) >= 3  # 20 J counters at 45 W wrap every ~0.44 s
    assert doc["totals"]["coverage_measured"] == 1.0 and doc["totals"]["estimated_j"] == 0


def test_rapl_permission_denied_is_unavailable_and_falls_back_to_an_estimate(tmp_path, monkeypatch):
    fake = FakeRapl(tmp_path / "powercap")
    real_read = rapl_mod._read

    def kernel_read(path):
        # Kernels patched for CVE-2020-8694 make energy_uj root-only: reads fail with EACCES.
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(rapl_mod, "_read", kernel_read)
    with pytest.raises(SensorUnavailable, match="permission denied reading .*energy_uj"):
        discover_rapl(fake.root)
    missing: list[dict] = []
    sensors = discover_sensors(EnergyConfig(rapl_root=str(fake.root)), unavailable=missing, nvml=_no_driver())
    assert [type(s) for s in sensors] == [CpuTimeEstimate]
    assert {m["sensor"] for m in missing} == {"gpu", "rapl"}
    assert "permission denied" in next(m["reason"] for m in missing if m["sensor"] == "rapl")


def _no_driver():
    nv = fake_nvml(1)
    nv.driver_loaded = False
    return nv


def test_missing_sensors_yield_an_estimate_flagged_estimated_never_zero(tmp_path):
    cfg = EnergyConfig(rapl_root=str(tmp_path / "no-powercap"), cpu_tdp_w=64.0)
    missing: list[dict] = []
    sensors = discover_sensors(cfg, unavailable=missing, nvml=_no_driver())
    mon = EnergyMonitor(cfg, run_id="est", sensors=sensors).start()
    mon.unavailable = missing
    with mon.window("train"):
        _busy(0.4)
        mon.step(0, 100)
    doc = mon.stop()
    t = doc["totals"]
    assert t["it_energy_j"] > 0 and t["estimated_j"] == t["it_energy_j"] and t["measured_j"] == 0
    assert t["coverage_measured"] == 0.0 and t["estimated"] is True
    (dev,) = doc["devices"]
    assert dev["source"] == "estimate" and "64 W" in dev["assumption"]
    assert {u["sensor"] for u in doc["unavailable"]} == {"gpu", "rapl"}
    assert t["energy_low_j"] < t["it_energy_j"] < t["energy_high_j"]  # the estimate carries its band


def test_cpu_estimate_uses_the_tdp_table_or_says_it_assumed():
    w, why = cpu_watts_per_thread(None, "AMD EPYC 7763 64-Core Processor")
    assert w == pytest.approx(280 / 128) and "looked-up TDP 280 W" in why
    w, why = cpu_watts_per_thread(None, "Mystery CPU")
    assert w > 0 and "not in the TDP table" in why


def test_nvml_counter_matches_the_true_energy_of_the_gpu():
    nv = fake_nvml(2)
    sensors = open_gpu_sensors(1, nvml=nv)
    assert [type(s) for s in sensors] == [NvmlEnergyCounter, NvmlPowerIntegrator]
    assert sensors[0].uuid == nv.gpus[1].uuid and sensors[1].counted is False
    mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="gpu", sensors=sensors).start()
    time.sleep(2.0)
    doc = mon.stop()
    truth = nv.gpus[1].profile.energy_j(mon.t1_s) - nv.gpus[1].profile.energy_j(mon.t0_s)
    assert doc["totals"]["it_energy_j"] == pytest.approx(truth, rel=0.01)
    (check,) = doc["cross_checks"]
    assert check["source"] == "nvml_power" and check["reference_source"] == "nvml_energy"
    assert abs(check["diff_rel"]) < 0.10  # 1-s power averages integrated vs the counter


def test_nvml_counter_reset_is_counted_from_zero_not_negative():
    nv = fake_nvml(1)
    (counter,) = open_gpu_sensors(0, nvml=nv, cross_check=False)
    mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="reset", sensors=[counter]).start()
    time.sleep(0.6)
    nv.gpus[0].reset_at_s = time.monotonic()  # the driver reloads mid-run
    time.sleep(0.6)
    doc = mon.stop()
    truth = nv.gpus[0].profile.energy_j(mon.t1_s) - nv.gpus[0].profile.energy_j(mon.t0_s)
    assert doc["devices"][0]["resets"] == 1
    assert doc["totals"]["it_energy_j"] == pytest.approx(truth, rel=0.05)


def test_gpu_without_energy_counter_integrates_power_and_says_so():
    nv = fake_nvml(1, has_counter=False)
    (power,) = open_gpu_sensors(0, nvml=nv)
    assert isinstance(power, NvmlPowerIntegrator) and power.counted and "no total-energy counter" in power.note
    mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="pwr", sensors=[power]).start()
    time.sleep(2.0)
    doc = mon.stop()
    truth = nv.gpus[0].profile.energy_j(mon.t1_s) - nv.gpus[0].profile.energy_j(mon.t0_s)
    assert doc["by_source"]["nvml_power"]["integrated"] is True
    assert doc["totals"]["it_energy_j"] == pytest.approx(truth, rel=0.08)


def test_cpu_estimate_counts_a_child_process_that_lives_and_exits_between_scans():
    import subprocess
    import sys

    est = CpuTimeEstimate(tdp_w=None, model="Mystery CPU")
    before = est.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt=time.process_time()\nwhile time.process_time()-t<0.4: pass"])
    child.wait()
    # The child burned ~0.4 s of CPU (plus interpreter start-up) and was never seen alive by a scan.
    assert est.cpu_seconds() - before >= 0.4
    assert est.read(time.monotonic()) >= 0.4 * est.w_per_thread


def test_cpu_estimate_counts_a_child_seen_alive_once_after_it_is_waited_for(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(CpuTimeEstimate, "_CHILDREN_REFRESH_S", 0.05)
    est = CpuTimeEstimate(tdp_w=None, model="Mystery CPU")
    before = est.cpu_seconds()
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.6: pass"
    children = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    while any(c.poll() is None for c in children):  # scanned alive, then reaped by poll()
        est.read(time.monotonic())
        time.sleep(0.05)
    est.read(time.monotonic())
    # 2 × 0.6 s of burn plus interpreter start-up; counting a reaped child's last live reading on top of
    # the kernel's children times would give about twice that.
    assert 1.2 <= est.cpu_seconds() - before <= 1.9


def test_cpu_estimate_counts_a_grandchild_when_its_parent_waits_for_it(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(CpuTimeEstimate, "_CHILDREN_REFRESH_S", 0.05)
    est = CpuTimeEstimate(tdp_w=None, model="Mystery CPU")
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.6: pass"
    # The child waits for its burning grandchild, then idles: the grandchild's time is in the child's
    # children times, which must count while the child still lives (not only once we reap it).
    nested = (f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {burn!r}])\n"
              "print('done', flush=True)\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", nested], stdout=subprocess.PIPE, text=True)
    try:
        est.read(time.monotonic())
        assert child.stdout.readline().strip() == "done"
        time.sleep(0.1)
        assert est.cpu_seconds() >= 0.6
    finally:
        child.kill()
        child.wait()


def test_gpu_without_nvml_is_charged_its_board_power_as_an_estimate():
    from m6.energy.sensors import GpuBoardPowerEstimate

    g = GpuBoardPowerEstimate("NVIDIA A100-SXM4-80GB")
    t = g.t0_s + 2.0
    assert g.read(t) == pytest.approx(800.0) and g.estimated and "looked-up board power 400 W" in g.assumption
    assert GpuBoardPowerEstimate("Some Future GPU").board_w == 300.0
    assert GpuBoardPowerEstimate.for_this_process() is None  # no CUDA initialised in this process
