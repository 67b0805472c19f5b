"""MoE health aggregation over an evaluation, by hand: summed loads, CV, drop rate, token-weighted entropy."""

from __future__ import annotations

import math

import pytest

from m6.eval.moe_health import MoEHealth, overall


def test_loads_sum_over_forwards_before_cv_and_drop_rate():
    h = MoEHealth()
    # two forwards of one layer: each alone is imbalanced, together they are uniform
    h.add([{"layer": 1, "tokens": 4, "assignments": 4, "tokens_per_expert": [4, 0], "dropped": 1, "router_entropy": 0.2}])
    h.add([{"layer": 1, "tokens": 12, "assignments": 12, "tokens_per_expert": [4, 8], "dropped": 0, "router_entropy": 0.6}])
    (layer,) = h.summary()
    assert layer["tokens_per_expert"] == [8, 8] and layer["load_cv"] == 0.0
    assert layer["load_share"] == [0.5, 0.5]
    assert layer["drop_rate"] == pytest.approx(1 / 16)
    assert layer["router_entropy"] == pytest.approx((0.2 * 4 + 0.6 * 12) / 16)
    assert layer["router_entropy_max"] == pytest.approx(math.log(2))


def test_layers_are_kept_apart_and_averaged_for_the_gate():
    h = MoEHealth()
    h.add([{"layer": 1, "tokens": 4, "tokens_per_expert": [3, 1], "dropped": 0, "router_entropy": 0.5},
           {"layer": 3, "tokens": 4, "tokens_per_expert": [2, 2], "dropped": 2, "router_entropy": 0.7}])
    layers = h.summary()
    assert [x["layer"] for x in layers] == [1, 3]
    assert layers[0]["load_cv"] == pytest.approx(1.0 / 2.0)  # std 1 over mean 2
    o = overall(layers)
    assert o["load_cv"] == pytest.approx(0.25) and o["drop_rate"] == pytest.approx(0.25)
    assert overall([]) == {}
