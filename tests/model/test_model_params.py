"""Parameter counts: closed form equals the real module (built on the meta device) for every preset."""

from __future__ import annotations

import dataclasses

import pytest

from m6.config import PRESETS, preset
from m6.model.params import count_params, meta_param_count


@pytest.mark.parametrize("name", list(PRESETS))
def test_closed_form_count_equals_the_module_built_on_meta(name):
    cfg = preset(name).model
    counts = count_params(cfg)
    assert counts["total"] == meta_param_count(cfg)
    assert 0 < counts["active"] <= counts["total"]
    # at least the attention projections of every layer, forward and backward
    assert counts["train_flops_per_token"] > 6 * cfg.n_layers * 4 * cfg.d_model ** 2


def test_paper_presets_come_out_at_their_advertised_sizes():
    sizes = {n: count_params(preset(n).model)["total"] for n in ("m6-10b", "m6-100b", "m6-1t", "m6-10t")}
    assert sizes["m6-10t"] == pytest.approx(1.0e13, rel=0.02)
    assert sizes["m6-1t"] == pytest.approx(1.0e12, rel=0.02)
    assert sizes["m6-100b"] == pytest.approx(1.0e11, rel=0.05)
    assert sizes["m6-10b"] == pytest.approx(1.0e10, rel=0.05)


def test_sharing_stores_one_block_per_period_and_moe_counts_active_experts_only():
    cfg = preset("tiny").model
    shared = dataclasses.replace(cfg, n_layers=6, share_layers=True)
    real = dataclasses.replace(cfg, n_layers=6)
    assert count_params(shared)["total"] == meta_param_count(shared) < count_params(real)["total"]
    assert count_params(shared)["train_flops_per_token"] == count_params(real)["train_flops_per_token"]
    top2 = dataclasses.replace(cfg, top_k=2)
    per_expert = 2 * cfg.d_model * cfg.expert_d_ff
    assert count_params(top2)["active"] - count_params(cfg)["active"] == per_expert


def test_model_package_imports_nothing_from_other_stages_or_heavy_libraries():
    import ast
    from pathlib import Path

    import m6.model

    forbidden = ("m6.train", "m6.data", "m6.serve", "m6.eval", "m6.energy", "kfp", "deepspeed")
    for path in Path(m6.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith(forbidden), f"{path.name} imports {n}"
