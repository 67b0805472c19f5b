"""Integration with a real Prometheus server and a real Pushgateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from m6.config import EnergyConfig
from m6.energy.monitor import EnergyMonitor
from m6.energy.report import REPORT_MD

HERE = Path(__file__).resolve().parent


def test_prometheus_scrapes_a_training_process_and_promql_returns_the_reported_joules(prometheus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    worker = subprocess.Popen([sys.executable, str(HERE / "prom_worker.py"), str(out), "12"])
    try:
        deadline = time.monotonic() + 60
        while not (out / "port").exists():
            assert worker.poll() is None and time.monotonic() < deadline, "training process did not start"
            time.sleep(0.1)
        prom = prometheus([f"127.0.0.1:{(out / 'port').read_text()}"])
        while not (out / "done").exists():
            assert worker.poll() is None and time.monotonic() < deadline + 60, "training did not finish"
            time.sleep(0.2)
        doc = json.loads((out / "energy.json").read_text())
        reported = doc["totals"]["it_energy_j"]
        assert reported > 0 and doc["totals"]["estimated"]  # no GPU and no RAPL here: an estimate, never 0
        q = 'sum(m6_energy_joules_total{run_id="prom-train"})'
        got = None
        end = time.monotonic() + 30
        while time.monotonic() < end:
            res = prom.query(q)
            got = float(res[0]["value"][1]) if res else None
            if got is not None and got == pytest.approx(reported, rel=1e-9):
                break
            time.sleep(0.5)
        assert got == pytest.approx(reported, rel=1e-9)
        report = (out / REPORT_MD).read_text()
        assert f"({reported:.6g} J)" in report  # the report states the same joules
        (train,) = prom.query('m6_energy_joules_total{run_id="prom-train", stage="train"}')
        assert float(train["value"][1]) == pytest.approx(doc["stages"]["train"]["energy_j"], rel=1e-9)
        assert train["metric"]["estimated"] == "true" and train["metric"]["source"] == "estimate"
        (tokens,) = prom.query('m6_tokens_total{run_id="prom-train"}')
        assert float(tokens["value"][1]) == doc["totals"]["tokens"] == 12 * 4 * 32
        (carbon,) = prom.query('m6_carbon_grams_total{run_id="prom-train"}')
        assert float(carbon["value"][1]) == pytest.approx(doc["totals"]["carbon_g"], rel=1e-9)
    finally:
        (out / "release").write_text("")
        worker.wait(timeout=60)
    assert worker.returncode == 0


def test_a_short_step_pushes_its_energy_to_the_pushgateway(pushgateway):
    # energy.pushgateway set: stop() pushes the step's final figures itself.
    mon = EnergyMonitor(EnergyConfig(pushgateway=pushgateway), run_id="push-step").start()
    with mon.window("curate"):
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            sum(i * i for i in range(1000))
    doc = mon.stop()
    assert doc["pushed_to"] == pushgateway
    text = urllib.request.urlopen(pushgateway + "/metrics", timeout=5).read().decode()
    pushed = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("job") == "m6-push-step" and s.labels.get("run_id") == "push-step":
                pushed.setdefault(s.name, []).append(s)
    joules = pushed["m6_energy_joules_total"]
    assert {s.labels["stage"] for s in joules} >= {"curate"}
    assert sum(s.value for s in joules) == pytest.approx(doc["totals"]["it_energy_j"], rel=1e-9)
    assert pushed["m6_carbon_grams_total"][0].value == pytest.approx(doc["totals"]["carbon_g"], rel=1e-9)
    assert all(s.labels["estimated"] == "true" for s in joules)


def test_push_to_an_unreachable_gateway_names_it():
    from .fakes import free_port

    mon = EnergyMonitor(EnergyConfig(), run_id="x").start()
    mon.stop()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OSError, match=f"push to Pushgateway {url}"):
        mon.push(url, job="j")


class _DcgmExporter:
    """dcgm-exporter's energy counter for fake GPUs: millijoules, labelled by UUID, read at scrape time."""

    def __init__(self, nv):
        self.nv = nv

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        # dcgm-exporter's counter has no _total suffix, which prometheus_client's counters would add.
        fam = GaugeMetricFamily("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy since boot (mJ).",
                                labels=["gpu", "UUID", "Hostname"])
        for g in self.nv.gpus:
            fam.add_metric([str(g.index), g.uuid, "node-a"], float(g.counter_mj(time.monotonic())))
        yield fam
        # Kepler's per-pod joules, as if it attributed GPU 1 to the pod "trainer-0".
        kepler = GaugeMetricFamily("kepler_container_joules_total", "Pod energy (J).", labels=["pod_name"])
        kepler.add_metric(["trainer-0"], self.nv.gpus[1].counter_mj(time.monotonic()) / 1000)
        yield kepler


def test_dcgm_and_kepler_cross_checks_query_prometheus_for_the_runs_gpus_and_pod(prometheus, tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, start_http_server

    from m6.energy.nvml import open_gpu_sensors
    from m6.energy.report import render

    from .fakes import fake_nvml

    nv = fake_nvml(2)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_DcgmExporter(nv))
    server, _ = start_http_server(0, addr="127.0.0.1", registry=reg)
    try:
        prom = prometheus([f"127.0.0.1:{server.server_address[1]}"])
        prom.wait_scraping(1)
        time.sleep(0.6)  # another scrape before the run starts
        mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="dcgm",
                            sensors=open_gpu_sensors(1, nvml=nv, cross_check=False)).start()
        time.sleep(4.0)
        mon.stop()
        mon.write(str(tmp_path / "energy.json"))
        time.sleep(1.5)  # let Prometheus scrape past the end of the run
        monkeypatch.setenv("POD_NAME", "trainer-0")
        s = render(str(tmp_path), prometheus_url=prom.url)
    finally:
        server.shutdown()
    dcgm, kepler = s["external_cross_checks"]
    assert "error" not in dcgm and "error" not in kepler, s["external_cross_checks"]
    assert kepler["source"] == "kepler" and 'pod_name="trainer-0"' in kepler["query"]
    assert kepler["energy_j"] == pytest.approx(kepler["ours_j"], rel=0.10)
    assert dcgm["source"] == "dcgm" and nv.gpus[1].uuid in dcgm["query"] and nv.gpus[0].uuid not in dcgm["query"]
    assert dcgm["energy_j"] == pytest.approx(dcgm["ours_j"], rel=0.10)
    assert "Exporter cross-checks" in (tmp_path / "energy_report.md").read_text()


def test_m6_train_is_scraped_while_it_runs_and_pushes_its_final_joules(prometheus, pushgateway, tmp_path):
    from .fakes import free_port

    raw, data, out = tmp_path / "raw", tmp_path / "data", tmp_path / "m6run"
    m6 = [sys.executable, "-m", "m6"]
    subprocess.run([*m6, "data", "synth", "--out", str(raw), "--n", "80"], check=True, capture_output=True)
    subprocess.run([*m6, "curate", "--input", str(raw), "--output", str(data)], check=True, capture_output=True)
    port = free_port()
    prom = prometheus([f"127.0.0.1:{port}"], pushgateway=pushgateway)
    prom.wait_scraping(1, job="pushgateway")  # scraping has begun; the trainer's port comes up later
    cfg = tmp_path / "energy.json"
    cfg.write_text(json.dumps({"energy": {"pushgateway": pushgateway}}))
    train = subprocess.run([*m6, "train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "40",
                            "--metrics-port", str(port), "--config", str(cfg), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    doc = json.loads((out / "energy.json").read_text())
    assert doc["pushed_to"] == pushgateway
    q = 'sum(m6_energy_joules_total{job="m6-m6run"})'
    got, end = None, time.monotonic() + 20
    while time.monotonic() < end:
        res = prom.query(q)
        got = float(res[0]["value"][1]) if res else None
        if got == pytest.approx(doc["totals"]["it_energy_j"], rel=1e-9):
            break
        time.sleep(0.5)
    assert got == pytest.approx(doc["totals"]["it_energy_j"], rel=1e-9)
    # While training ran, Prometheus scraped the trainer's own /metrics (rank 0 serves on --metrics-port).
    (direct,) = prom.query('max_over_time(m6_steps_total{job="m6"}[10m])')
    assert 0 < float(direct["value"][1]) <= 40
