"""Pseudo-to-Real inside one run: shared layers delinked mid-run, training continues without a jump."""

from __future__ import annotations

import dataclasses
import json

import pytest

from m6.train.checkpoint import load_model
from m6.train.launch import train

from trainhelp import step_losses, tiny, window_mean

DELINK = 8


def _cfg(**kw):
    c = tiny(steps=16, ep_size=2, zero_stage=0, log_every=4, save_every=16, **kw)
    # Four layers with an MoE every second one: the pseudo model stores two blocks, the real one four.
    c.model = dataclasses.replace(c.model, n_layers=4, share_layers=True)
    return c


def test_delink_mid_run_continues_from_the_pseudo_model_without_a_loss_jump(corpus, tmp_path):
    pseudo = tmp_path / "pseudo"
    train(_cfg(), corpus, str(pseudo), nproc=2, log_sink=open(tmp_path / "a.log", "w"))
    p2r = tmp_path / "p2r"
    s = train(_cfg(p2r_delink_step=DELINK), corpus, str(p2r), nproc=2, log_sink=open(tmp_path / "b.log", "w"))
    assert s["p2r_delink_step"] == DELINK
    a, b = step_losses(pseudo), step_losses(p2r)
    # Up to and including the first step after delinking the weights are the same function,
    # so the losses match the pseudo run exactly: model and Adam state were carried across.
    for step in range(1, DELINK + 2):
        for obj, v in a[step].items():
            assert b[step][obj] == pytest.approx(v, rel=1e-5), f"step {step} {obj}"
    # After that the real model trains on: losses stay finite and keep falling.
    late = range(DELINK + 2, 17)
    for obj in {o for s_ in late for o in b.get(s_, {})}:
        assert all(b[s_][obj] == b[s_][obj] for s_ in late if obj in b[s_])
    objs = [o for o in ("caption", "mm", "text", "contrastive")
            if any(o in b[x] for x in range(1, 6)) and any(o in b[x] for x in late)]
    assert objs and any(window_mean(b, late, o) < window_mean(b, range(1, 6), o) for o in objs)
    model, cfg, _, meta = load_model(str(p2r))
    assert cfg.model.share_layers is False and len(model.encoder.blocks) == 4
    assert json.loads((p2r / "checkpoints" / "step-00000016" / "m6.json").read_text())["config"]["model"]["n_layers"] == 4
    # A run resumed after the switch rebuilds the real model before loading its checkpoint.
    cfg = _cfg(p2r_delink_step=DELINK)
    cfg.train = dataclasses.replace(cfg.train, steps=20)
    s = train(cfg, corpus, str(p2r), nproc=2, resume="auto", log_sink=open(tmp_path / "c.log", "w"))
    assert s["start_step"] == 16 and s["steps"] == 20
    assert all(v == v for step in range(17, 21) for v in step_losses(p2r)[step].values())
