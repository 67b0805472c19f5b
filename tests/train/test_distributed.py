"""Two DeepSpeed processes over gloo on the tiny preset: EP + ZeRO-2, ZeRO-3, offloads, S3, metrics."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from m6 import storage
from m6.train.checkpoint import load_model
from m6.train.launch import free_port, spawn, supervise, train

from trainhelp import step_losses, tiny, window_mean


def _assert_learns(out, steps: int) -> None:
    losses = step_losses(out)
    early, late = range(1, steps // 3 + 1), range(steps - steps // 3 + 1, steps + 1)
    compared = 0
    # Generative objectives only: InfoNCE over a micro-batch of 4 sits near ln 4 for many steps.
    for obj in ("text", "caption", "mm"):
        try:
            a, b = window_mean(losses, early, obj), window_mean(losses, late, obj)
        except AssertionError:
            continue
        assert b < a, f"{obj} loss did not go down: {a:.4f} -> {b:.4f}"
        compared += 1
    assert compared >= 1


def test_ep2_zero2_trains_serves_metrics_and_writes_the_run_layout(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(steps=24, ep_size=2, zero_stage=2, log_every=4, save_every=12, keep_last=1)
    cfg.energy.enabled = True
    port = free_port()
    procs = spawn(cfg, corpus, str(out), nproc=2, metrics_port=port, log_sink=open(tmp_path / "log", "w"))
    scraped = {}
    deadline = time.monotonic() + 240
    while len(scraped) < 2 and time.monotonic() < deadline and any(p.poll() is None for p in procs):
        for r in range(2):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port + r}/metrics", timeout=1).read().decode()
            except OSError:
                continue
            if "m6_train_step" in text and "m6_train_loss" in text:
                scraped[r] = text
        time.sleep(0.2)
    supervise(procs)
    assert set(scraped) == {0, 1}, "each rank serves its own /metrics"
    _assert_learns(out, 24)
    s = json.loads((out / "train_summary.json").read_text())
    assert s["steps"] == 24 and s["world_size"] == 2 and s["ep_size"] == 2
    assert s["checkpoint"].endswith("step-00000024") and Path(s["energy"]).exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000024"], "keep_last=1 retention"
    ck = out / "checkpoints" / "step-00000024"
    assert {"COMPLETE", "m6.json", "model.safetensors", "rank-00000.pt", "rank-00001.pt"} <= {p.name for p in ck.iterdir()}
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [4, 8, 12, 16, 20, 24]
    last = rec[-1]
    for k in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm"):
        assert last[k] > 0, k
    assert last["moe"] and {"load_cv", "drop_rate"} <= set(last["moe"][0])
    # Job-wide joules at each log interval are the ranks' figures summed once, never 0 and never more than
    # the run total energy.json states at the end (its span runs a little longer: the last checkpoint).
    energy = json.loads((out / "energy.json").read_text())["totals"]
    assert 0 < rec[0]["energy_j"] < last["energy_j"] <= energy["it_energy_j"]
    assert last["energy_j"] >= 0.5 * energy["it_energy_j"] and last["j_per_token"] > 0
    # The consolidated model holds all 4 experts: rank r's 2 local experts in slots 2r, 2r+1.
    model, cfg2, tok, meta = load_model(str(out))
    assert meta["step"] == 24 and tok.get_vocab_size() == cfg2.model.vocab_size
    full = dict(model.named_parameters())
    for r in range(2):
        local = torch.load(io.BytesIO((ck / f"rank-{r:05d}.pt").read_bytes()), weights_only=False)["model"]
        for name, t in local.items():
            if "experts.w" in name:
                torch.testing.assert_close(full[name][2 * r:2 * r + 2], t)
                assert full[name].shape[0] == 4


def test_zero3_two_processes_lower_the_loss(corpus, tmp_path):
    # Contrastive stays off: DeepSpeed ZeRO-3 cannot run a module twice before one backward.
    cfg = tiny(steps=18, zero_stage=3, ep_size=1, log_every=6, save_every=18,
               objective_weights={"text": 1.0, "caption": 1.0, "mm": 1.0})
    s = train(cfg, corpus, str(tmp_path / "z3"), nproc=2, log_sink=open(tmp_path / "log", "w"))
    assert s["zero_stage"] == 3
    _assert_learns(tmp_path / "z3", 18)
    model, _, _, _ = load_model(str(tmp_path / "z3"))
    assert model.logit_scale.dim() == 0  # trained as [1] under ZeRO-3, saved in the model's own shape


def test_optimizer_offload_with_ep2_lowers_the_loss(corpus, tmp_path):
    cfg = tiny(steps=18, zero_stage=2, ep_size=2, offload="optimizer", log_every=6, save_every=18)
    train(cfg, corpus, str(tmp_path / "off"), nproc=2, log_sink=open(tmp_path / "log", "w"))
    _assert_learns(tmp_path / "off", 18)


def test_granular_offload_places_the_chosen_layers_on_the_host(corpus, tmp_path):
    cfg = tiny(steps=18, zero_stage=0, ep_size=2, offload="granular:0.5", log_every=6, save_every=18)
    s = train(cfg, corpus, str(tmp_path / "gr"), nproc=2, log_sink=open(tmp_path / "log", "w"))
    assert s["offloaded_layers"] == [0] and s["offload_placement"]["0"] == "cpu"
    _assert_learns(tmp_path / "gr", 18)


def test_one_process_trains_from_s3_shards_into_s3(corpus, s3_env, tmp_path):
    data, out = s3_env + "/ds", s3_env + "/runs/one"
    storage.upload_dir(corpus, data)
    s = train(tiny(steps=6, log_every=3, save_every=3), data, out, nproc=1, log_sink=open(tmp_path / "log", "w"))
    assert s["checkpoint"] == out + "/checkpoints/step-00000006"
    assert storage.is_complete(s["checkpoint"]) and storage.exists(out + "/metrics.jsonl")
    model, cfg, tok, meta = load_model(out)
    assert meta["checkpoint"] == s["checkpoint"] and cfg.preset == "tiny"


def test_a_failing_rank_stops_the_job_with_its_error(corpus, tmp_path):
    from m6.errors import UserError

    procs = spawn(tiny(steps=4, ep_size=3), corpus, str(tmp_path / "o"), nproc=2, log_sink=open(tmp_path / "log", "w"))
    with pytest.raises(UserError, match=r"(?s)exited with code 2.*--ep 3 does not divide the number of processes 2"):
        supervise(procs)


def test_train_command_prints_the_summary_as_json(corpus, tmp_path, capsys):
    from m6.cli import main

    assert main(["train", "--preset", "tiny", "--data", corpus, "--out", str(tmp_path / "cli"), "--steps", "4",
                 "--save-every", "2", "--log-every", "2", "--no-energy", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["steps"] == 4 and s["first_loss"] and s["last_loss"] > 0 and s["tokens_per_s"] > 0
    assert s["checkpoint"].endswith("step-00000004") and s["energy"] is None
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_activation_checkpointing_recomputes_blocks_without_changing_the_losses(corpus, tmp_path):
    runs = {}
    for ac in (False, True):
        cfg = tiny(steps=6, ep_size=2, zero_stage=2, log_every=3, save_every=6, activation_checkpointing=ac)
        s = train(cfg, corpus, str(tmp_path / f"ac{ac}"), nproc=2, log_sink=open(tmp_path / f"ac{ac}.log", "w"))
        assert s["activation_checkpointed_blocks"] == (2 if ac else 0)
        runs[ac] = step_losses(tmp_path / f"ac{ac}")
    assert sorted(runs[True]) == list(range(1, 7))
    for step, row in runs[False].items():
        for obj, v in row.items():
            assert runs[True][step][obj] == pytest.approx(v, rel=1e-4), f"step {step} {obj}"
