"""The `m6 eval` command on a saved training run: --json output, the gate, loss curves, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

from m6 import storage
from m6.cli import main


def test_m6_eval_json_prints_metrics_and_gate_decision(trained, trained_run, eval_data, tmp_path, capsys):
    out = str(tmp_path / "eval")
    rc = main(["eval", "--model", trained_run, "--data", eval_data, "--out", out, "--gate", "--json",
               "--champion", str(tmp_path / "deployed"), "--max-samples", "40"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gate"]["decision"] == "promote" and summary["gate"]["first_model"]
    assert summary["metrics"]["retrieval.mean_recall_lift"] > 2.0
    assert summary["samples"] == 40 and summary["split"] == "test"
    doc = storage.read_json(storage.join(out, "eval.json"))
    step = trained[3]["step"]
    assert doc["model"]["step"] == step and doc["model"]["checkpoint"].endswith(f"step-{step:08d}")
    assert doc["model"]["preset"] == "tiny"
    page = storage.read_text(storage.join(out, "report.html"))
    assert "no training metrics.jsonl" not in page  # the run's loss curves were found and plotted


def test_m6_eval_human_summary_names_the_report(trained_run, eval_data, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert main(["eval", "--model", trained_run, "--data", eval_data, "--out", out, "--max-samples", "12"]) == 0
    text = capsys.readouterr().out
    assert "retrieval.mean_recall" in text and f"report: {out}/report.html" in text


def test_m6_eval_on_a_missing_dataset_fails_with_one_clear_line(trained_run, tmp_path):
    missing = str(tmp_path / "no-such-dataset")
    p = subprocess.run([sys.executable, "-m", "m6", "eval", "--model", trained_run, "--data", missing,
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no manifest.json" in p.stderr and missing in p.stderr and "Traceback" not in p.stderr


def test_m6_eval_config_file_thresholds_hold_the_model(trained_run, eval_data, tmp_path, capsys):
    cfg = tmp_path / "strict.json"
    cfg.write_text(json.dumps({"eval": {"thresholds": {"retrieval.mean_recall_lift": 100.0}, "max_samples": 16}}))
    rc = main(["eval", "--model", trained_run, "--data", eval_data, "--out", str(tmp_path / "e"), "--gate",
               "--config", str(cfg), "--json"])
    assert rc == 0
    gate = json.loads(capsys.readouterr().out)["gate"]
    assert gate["decision"] == "hold" and "retrieval.mean_recall_lift" in gate["reason"] and "100" in gate["reason"]


def test_m6_eval_bad_config_key_is_named(trained_run, eval_data, tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"eval": {"batch_sise": 4}}))
    rc = main(["eval", "--model", trained_run, "--data", eval_data, "--out", str(tmp_path / "e"), "--config", str(cfg)])
    assert rc == 2
    assert "eval.batch_sise" in capsys.readouterr().err


def test_gate_reevaluates_a_champion_measured_on_other_data(trained_run, eval_data, other_data, tmp_path):
    from m6.config import EvalConfig
    from m6.eval.run import evaluate

    cfg = EvalConfig(max_samples=40)
    champ = str(tmp_path / "champ")
    evaluate(trained_run, other_data, champ, cfg=cfg)
    cand = evaluate(trained_run, eval_data, str(tmp_path / "cand"), cfg=cfg, gate=True, champion_uri=champ)
    g = cand["gate"]
    assert g["champion_eval"].startswith("re-evaluated on this data") and g["comparable"] is True
    # the same weights on the same data: the primary metric cannot improve
    assert g["decision"] == "hold" and "did not improve" in g["reason"]
    assert storage.exists(str(tmp_path / "cand" / "champion" / "eval.json"))

    # a champion whose checkpoint is gone is compared on its stored figures, flagged as not comparable
    stale = storage.read_json(storage.join(champ, "eval.json"))
    stale["model"]["checkpoint"] = str(tmp_path / "pruned-checkpoint")
    storage.write_json(str(tmp_path / "stale" / "eval.json"), stale)
    g2 = evaluate(trained_run, eval_data, str(tmp_path / "cand2"), cfg=cfg, gate=True,
                  champion_uri=str(tmp_path / "stale"))["gate"]
    assert "not available" in g2["champion_eval"] and g2["comparable"] is False


def test_weights_of_another_model_version_fail_with_one_clear_line(trained_run, eval_data, tmp_path, capsys):
    import shutil

    from safetensors.torch import load, save

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (ckpt,) = (run / "checkpoints").glob("step-*")
    state = load((ckpt / "model.safetensors").read_bytes())
    state["img_pos"] = state["img_pos"][:, :-1].contiguous()  # one position fewer than this model has
    (ckpt / "model.safetensors").write_bytes(save(state))
    rc = main(["eval", "--model", str(run), "--data", eval_data, "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "do not fit this version of the model" in err and "img_pos" in err
