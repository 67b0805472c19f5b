"""Gate decisions: first model, promote, hold on threshold, guarded regression and no improvement."""

from __future__ import annotations

import pytest

from m6.config import ConfigError, EvalConfig, load
from m6.eval.gate import decide, flat_metrics


def _doc(**metrics):
    data = {"manifest_sha256": "abc", "split": "test"}
    return {"data": data, "metrics": {k.replace("__", "."): {"value": v, "split": "test", "samples": 10}
                                      for k, v in metrics.items()}}


CFG = EvalConfig(primary_metric="retrieval.mean_recall", thresholds={"retrieval.mean_recall_lift": 1.2},
                 guarded={"captioning.cider_d": 0.05, "lm.text.perplexity": 0.10})


def test_first_model_is_promoted_when_it_clears_thresholds():
    d = decide(_doc(retrieval__mean_recall=0.4, retrieval__mean_recall_lift=2.0), None, CFG)
    assert d["decision"] == "promote" and d["first_model"]
    assert "first model" in d["reason"]


def test_first_model_is_held_below_threshold():
    d = decide(_doc(retrieval__mean_recall=0.1, retrieval__mean_recall_lift=1.0), None, CFG)
    assert d["decision"] == "hold"
    assert "retrieval.mean_recall_lift=1" in d["reason"]


def test_missing_threshold_metric_holds():
    d = decide(_doc(retrieval__mean_recall=0.4), None, CFG)
    assert d["decision"] == "hold" and "missing" in d["reason"]


def test_promote_when_primary_improves_within_tolerances():
    champ = _doc(retrieval__mean_recall=0.40, retrieval__mean_recall_lift=2.0, captioning__cider_d=0.50,
                 lm__text__perplexity=20.0)
    cand = _doc(retrieval__mean_recall=0.45, retrieval__mean_recall_lift=2.2, captioning__cider_d=0.48,
                lm__text__perplexity=21.0)  # cider -4% and perplexity +5%: inside 5% / 10%
    d = decide(cand, champ, CFG)
    assert d["decision"] == "promote", d["reason"]
    assert d["comparable"] is True
    assert {c["check"] for c in d["checks"]} == {"threshold", "guard", "primary"}


def test_hold_when_a_guarded_metric_regresses_even_if_primary_improves():
    champ = _doc(retrieval__mean_recall=0.40, retrieval__mean_recall_lift=2.0, captioning__cider_d=0.50,
                 lm__text__perplexity=20.0)
    cand = _doc(retrieval__mean_recall=0.60, retrieval__mean_recall_lift=3.0, captioning__cider_d=0.50,
                lm__text__perplexity=23.0)  # perplexity is lower-is-better: +15% > 10%
    d = decide(cand, champ, CFG)
    assert d["decision"] == "hold"
    assert "lm.text.perplexity" in d["reason"]


def test_hold_when_primary_does_not_improve():
    champ = _doc(retrieval__mean_recall=0.40, retrieval__mean_recall_lift=2.0)
    cand = _doc(retrieval__mean_recall=0.40, retrieval__mean_recall_lift=2.0)
    d = decide(cand, champ, CFG)
    assert d["decision"] == "hold" and "did not improve" in d["reason"]


def test_different_eval_data_is_flagged():
    champ = _doc(retrieval__mean_recall=0.30, retrieval__mean_recall_lift=2.0)
    champ["data"]["manifest_sha256"] = "other"
    d = decide(_doc(retrieval__mean_recall=0.40, retrieval__mean_recall_lift=2.0), champ, CFG)
    assert d["decision"] == "promote" and d["comparable"] is False
    assert "different data" in d["reason"]


def test_flat_metrics_accepts_plain_maps_and_skips_non_numbers():
    assert flat_metrics({"a": 1, "b": {"value": 2.5}, "c": "x", "d": True}) == {"a": 1.0, "b": 2.5}


def test_eval_config_errors_name_the_field():

    with pytest.raises(ConfigError, match="eval.split.*never the training split"):
        load(overrides={"eval": {"split": "train"}})
    with pytest.raises(ConfigError, match="eval.guarded"):
        load(overrides={"eval": {"guarded": {"captioning.cider_d": -0.1}}})
    with pytest.raises(ConfigError, match="eval.thresholds.retrieval.mean_recall: expected float"):
        load(overrides={"eval": {"thresholds": {"retrieval.mean_recall": "high"}}})
    assert load(overrides={"eval": {"max_samples": None}}).eval.max_samples is None
