"""`m6 energy report`: Markdown and plot from energy.json, locally and on S3, with clear errors."""

from __future__ import annotations

import json
import time

import pytest

from m6 import storage
from m6.cli import main
from m6.config import EnergyConfig
from m6.energy.monitor import EnergyMonitor
from m6.energy.nvml import open_gpu_sensors

from .fakes import fake_nvml


def _run_doc(uri: str) -> dict:
    nv = fake_nvml(1)
    cfg = EnergyConfig(sample_hz=20, grid_gco2_per_kwh=100.0, pue=1.2)
    mon = EnergyMonitor(cfg, run_id="rep", sensors=open_gpu_sensors(0, nvml=nv), flops_per_token=6e6).start()
    with mon.window("train"):
        for step in range(5):
            time.sleep(0.06)
            mon.step(step + 1, 1000)
    doc = mon.stop()
    mon.write(storage.join(uri, "energy.json"))
    return doc


def test_report_renders_markdown_and_png_with_the_documents_figures(tmp_path, capsys):
    doc = _run_doc(str(tmp_path))
    assert main(["energy", "report", "--run", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["it_energy_j"] == doc["totals"]["it_energy_j"] and s["estimated"] is False
    md = (tmp_path / "energy_report.md").read_text()
    png = (tmp_path / "energy_power.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    t = doc["totals"]
    assert f"({t['it_energy_j']:.6g} J)" in md and "**measured**" in md
    assert "carbon (100 gCO2e/kWh" in md and "× PUE 1.2" in md
    assert t["carbon_g"] == pytest.approx(t["it_energy_j"] * 1.2 / 3.6e6 * 100.0)
    assert t["j_per_flop"] == pytest.approx(t["it_energy_j"] / (5000 * 6e6))
    for model in ("GPT-3", "Switch Transformer", "GShard-600B"):
        assert model in md
    assert "1% of GPT-3's training energy: 12.9 MWh" in md
    assert "nvml_energy" in md and "nvml_power" in md  # the counter and its power-integration cross-check


def test_report_reads_and_writes_s3(s3_env, capsys):
    uri = f"{s3_env}/runs/r1"
    doc = _run_doc(uri)
    assert main(["energy", "report", "--run", uri]) == 0
    out = capsys.readouterr().out
    assert "energy of rep:" in out and "measured" in out
    assert storage.exists(f"{uri}/energy_report.md") and storage.exists(f"{uri}/energy_power.png")
    assert f"{doc['totals']['it_energy_j']:.6g} J" in storage.read_text(f"{uri}/energy_report.md")


def test_report_of_a_run_without_energy_json_says_so(tmp_path, capsys):
    assert main(["energy", "report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no energy.json" in err and str(tmp_path) in err
    (tmp_path / "energy.json").write_text(json.dumps({"schema": "other/v1"}))
    assert main(["energy", "report", "--run", str(tmp_path)]) == 2
    assert "not an m6 energy document" in capsys.readouterr().err
