"""`m6 eval` on what the real stages produce: synthesize → curate → train (a DeepSpeed process) → evaluate + gate."""

from __future__ import annotations

import html
import json

from m6 import storage
from m6.cli import main
from m6.config import preset


def test_eval_of_a_deepspeed_trained_run_on_curated_held_out_split(tmp_path, capsys):
    from m6.data.curate import curate
    from m6.data.shards import iter_dataset, split_of
    from m6.data.synth import synthesize
    from m6.train.launch import train

    cfg = preset("tiny")
    cfg.train.steps = 10
    raw, data, run, out = (str(tmp_path / p) for p in ("raw", "cur", "run", "eval"))
    synthesize(raw, n=160, seed=3)
    stats = curate([raw], data, cfg.data)
    train(cfg, data, run, nproc=1)
    capsys.readouterr()

    rc = main(["eval", "--model", run, "--data", data, "--out", out, "--gate", "--json",
               "--champion", str(tmp_path / "champion")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    doc = storage.read_json(storage.join(out, "eval.json"))
    assert doc["model"]["checkpoint"].endswith("step-00000010") and doc["model"]["step"] == 10
    # the evaluated split is exactly the curated test split, none of it in training
    assert doc["data"]["samples"] == stats["split"]["test"] == doc["data"]["overlap_check"]["samples_seen_by_split"]["test"]
    manifest = storage.read_json(storage.join(data, "manifest.json"))
    val, test = manifest["split"]["val_fraction"], manifest["split"]["test_fraction"]
    assert all(split_of(ex["key"], val, test) == "test" for ex in doc["examples"]["captions"])
    assert not {ex["key"] for ex in doc["examples"]["captions"]} & {s["__key__"] for s in iter_dataset(data, "train")}
    # a 10-step model: whatever the decision, it and its reason reach the output and the report
    assert summary["gate"]["decision"] in ("promote", "hold") and summary["gate"]["reason"]
    assert storage.read_json(storage.join(out, "metrics.json"))["metrics"]
    page = storage.read_text(storage.join(out, "report.html"))
    assert "no training metrics.jsonl" not in page and html.escape(summary["gate"]["reason"]) in page
