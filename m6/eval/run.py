"""``m6 eval``: evaluate a checkpoint on a held-out split, write eval.json, KFP metrics and the HTML report, gate it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from m6 import storage
from m6.config import EvalConfig
from m6.errors import UserError
from m6.eval import gate as gate_mod
from m6.eval.captioning import caption_metrics
from m6.eval.data import EvalSet, load_raw_folder, load_split
from m6.eval.moe_health import overall
from m6.eval.retrieval import chance_recall, recall_curve, retrieval_metrics

log = logging.getLogger(__name__)
SCHEMA = "m6.eval/v1"
_PERCENT = re.compile(r"(R@\d+|mean_recall|muge_mr|drop_rate)$")


def _metric_table(doc: dict, es: EvalSet, checkpoint: str) -> dict[str, dict]:
    """Flat ``{name: {"value", "split", "samples", "checkpoint"}}`` of every scalar metric."""
    m: dict[str, dict] = {}

    def put(name: str, value: float, samples: int) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            m[name] = {"value": float(value), "split": es.split, "samples": int(samples), "checkpoint": checkpoint}

    r = doc.get("retrieval")
    if r:
        for d, n in (("t2i", r["t2i"]["queries"]), ("i2t", r["i2t"]["queries"])):
            for k, v in r[d].items():
                if k.startswith("R@"):
                    put(f"retrieval.{d}.{k}", v, n)
        n_img = r["images"]
        for k in ("mean_recall", "muge_mr", "mean_recall_lift"):
            put(f"retrieval.{k}", r[k], n_img)
        put("retrieval.chance_mean_recall", r["chance"]["mean_recall"], n_img)
    c = doc.get("captioning")
    if c:
        put("captioning.bleu4", c["bleu4"], c["images"])
        put("captioning.cider_d", c["cider_d"], c["images"])
    for obj, v in (doc.get("lm") or {}).items():
        put(f"lm.{obj}.perplexity", v["perplexity"], v["samples"])
    moe = overall(doc.get("moe") or [])
    for k, v in moe.items():
        put(f"moe.{k}", v, es.samples)
    return m


def kfp_metrics(metrics: dict[str, dict]) -> dict:
    """The KFP ``Metrics`` shape: ``{"metrics": [{"name", "numberValue", "format"}]}`` with KFP-legal names."""
    items = []
    for name, v in metrics.items():
        legal = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("@", "-at-")).strip("-")[:63].rstrip("-")
        items.append({"name": legal, "numberValue": v["value"], "format": "PERCENTAGE" if _PERCENT.search(name) else "RAW"})
    return {"metrics": items}


def load_checkpoint(model_uri: str):
    """``(model, Config, tokenizer, meta)`` of a run, checkpoints root or checkpoint, via training's ``load_model``."""
    try:
        from m6.train.checkpoint import load_model
    except ImportError as e:  # an install without the training area
        raise UserError(f"cannot load {model_uri}: the training package is not available ({e})") from None
    try:
        return load_model(model_uri)
    except RuntimeError as e:  # torch's load_state_dict: weights of another model version
        first = str(e).strip().splitlines()
        raise UserError(f"{model_uri}: the checkpoint's weights do not fit this version of the model "
                        f"({first[-1].strip() if first else e})") from None


def _run_metrics(model_uri: str) -> list[dict]:
    """The training run's ``metrics.jsonl`` (loss curves), found from a run, checkpoints or checkpoint URI."""
    base = str(model_uri).rstrip("/")
    roots = [base]
    if "/checkpoints" in base:
        roots.insert(0, base.split("/checkpoints")[0])
    for root in roots:
        uri = storage.join(root, "metrics.jsonl")
        if storage.exists(uri):
            rows = []
            for i, line in enumerate(storage.read_text(uri).splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        log.warning("%s line %d is not JSON; skipped", uri, i + 1)
            return rows
    return []


def _trained_on(meta: dict) -> str | None:
    """The dataset URI a checkpoint was trained on, as its ``m6.json`` records it."""
    for v in (meta.get("data_uri"), meta.get("data"), (meta.get("data") or {}).get("uri") if isinstance(meta.get("data"), dict) else None):
        if isinstance(v, str):
            return v
    return None


def load_champion(champion_uri: str | None) -> dict | None:
    """The champion's ``eval.json`` from its URI or the folder beside its bundle; None when nothing is deployed yet."""
    if not champion_uri:
        return None
    uri = champion_uri if champion_uri.endswith(".json") else storage.join(champion_uri, "eval.json")
    if not storage.exists(uri):
        log.info("no champion eval at %s: treating the candidate as the first model", uri)
        return None
    doc = storage.read_json(uri)
    if not isinstance(doc, dict) or "metrics" not in doc:
        raise UserError(f"{uri}: not an eval.json (no 'metrics' key)")
    return doc


def evaluate(model_uri: str, data_uri: str, out_uri: str, *, cfg: EvalConfig | None = None, split: str | None = None,
             gate: bool = False, champion_uri: str | None = None, loaded: tuple | None = None) -> dict:
    """Evaluate a model on a held-out split and write ``eval.json``, ``metrics.json`` and ``report.html``.

    Args:
        model_uri: a training run, its checkpoints root or one checkpoint (see ``load_model``).
        data_uri: a curated dataset (``m6.shards/v1``).
        out_uri: where the three outputs go.
        cfg: evaluation settings; default: the checkpoint's ``eval`` config, else ``EvalConfig()``.
        split: overrides ``cfg.split``.
        gate: also decide promote/hold against thresholds and the champion.
        champion_uri: the deployed model's ``eval.json`` or the folder holding it.
        loaded: an already loaded ``(model, Config, tokenizer, meta)``, skipping ``load_model``.

    Returns:
        The ``eval.json`` document (with ``gate`` when ``gate`` is set).
    """
    t0 = time.perf_counter()
    model, run_cfg, tokenizer, meta = loaded if loaded is not None else load_checkpoint(model_uri)
    meta = meta or {}
    cfg = cfg or getattr(run_cfg, "eval", None) or EvalConfig()
    split = split or cfg.split
    if split not in ("test", "val", "all"):
        raise UserError(f"--split {split}: evaluate test, val or all; the training split is never evaluated")
    model.eval()
    es, data_sha = _load_data(data_uri, split, cfg, meta)
    timing = {"load_s": time.perf_counter() - t0}
    checkpoint = str(meta.get("checkpoint") or model_uri)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"uri": str(model_uri), "checkpoint": checkpoint, "step": meta.get("step"),
                  "preset": getattr(run_cfg, "preset", None)},
        "data": {"uri": str(data_uri), "split": split, "manifest_sha256": data_sha, "samples": es.samples,
                 "images": len(es.images), "texts": len(es.texts), "documents": len(es.docs),
                 "dropped": es.dropped, "overlap_check": es.overlap},
        "config": {k: getattr(cfg, k) for k in ("batch_size", "max_samples", "recall_ks", "ties", "caption_method",
                                                "caption_max_tokens", "seed")},
        "text_to_image": None,  # no image-generation head yet; its metrics join this document when one exists
    }
    from m6.eval import model_eval

    mcfg = run_cfg.model
    preds: list[str] = []
    top_images: list[list[int]] = []
    if es.images and es.texts:
        t = time.perf_counter()
        temb, iemb = model_eval.embed(model, mcfg, es, tokenizer, cfg.batch_size)
        doc["retrieval"], top_images = _retrieval(temb, iemb, es, cfg)
        timing["retrieval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        preds = model_eval.captions(model, mcfg, es, tokenizer, cfg.batch_size, cfg.caption_max_tokens, cfg.caption_method)
        captioned = [i for i, refs in enumerate(es.references) if refs]  # gallery distractors have none
        doc["captioning"] = caption_metrics([preds[i] for i in captioned], [es.references[i] for i in captioned])
        doc["captioning"].pop("per_item_cider_d")
        timing["captioning_s"] = time.perf_counter() - t
    t = time.perf_counter()
    doc["lm"], health = model_eval.perplexity(model, mcfg, es, tokenizer, cfg.batch_size, cfg.seed)
    doc["moe"] = health.summary()
    timing["lm_s"] = time.perf_counter() - t
    doc["metrics"] = _metric_table(doc, es, checkpoint)
    doc["examples"] = _examples(es, preds, top_images, cfg.num_examples)
    if gate:
        champion, note = _comparable_champion(load_champion(champion_uri), doc, data_uri, split, cfg, out_uri)
        doc["gate"] = {**gate_mod.decide(doc, champion, cfg), "champion_uri": champion_uri, "champion_eval": note}
    timing["total_s"] = time.perf_counter() - t0
    doc["timing_s"] = timing
    write_outputs(doc, es, out_uri, _run_metrics(model_uri))
    return doc


def _comparable_champion(champion: dict | None, candidate: dict, data_uri: str, split: str, cfg: EvalConfig,
                         out_uri: str) -> tuple[dict | None, str]:
    """The champion's metrics on the candidate's own eval data.

    After a retraining on newly curated data the champion's stored ``eval.json`` was
    computed on another test split, and comparing numbers across test sets says little.
    When the champion's checkpoint is still readable it is re-evaluated on this split
    (into ``<out>/champion/``); otherwise its stored figures are used and the gate
    marks the comparison as not comparable.
    """
    if champion is None:
        return None, "none deployed"
    if gate_mod.same_eval_data(candidate, champion) is not False:
        return champion, "stored eval.json (same data and split)"
    ckpt = (champion.get("model") or {}).get("checkpoint")
    try:
        loaded = load_checkpoint(ckpt) if ckpt else None
    except (UserError, FileNotFoundError, OSError) as e:
        log.warning("champion checkpoint %s not loadable (%s); comparing against its stored eval.json", ckpt, e)
        loaded = None
    if loaded is None:
        return champion, "stored eval.json (different data; champion checkpoint not available)"
    log.info("re-evaluating the champion %s on %s (%s) for a like-for-like gate", ckpt, data_uri, split)
    again = evaluate(ckpt, data_uri, storage.join(out_uri, "champion"), cfg=cfg, split=split, loaded=loaded)
    return again, f"re-evaluated on this data from {ckpt}"


def _load_data(data_uri: str, split: str, cfg: EvalConfig, meta: dict) -> tuple[EvalSet, str]:
    """The eval set and a fingerprint of its source (manifest or captions.jsonl), for comparing evaluations."""
    if not storage.exists(storage.join(data_uri, "manifest.json")) and storage.exists(storage.join(data_uri, "captions.jsonl")):
        if split != "all":
            raise UserError(f"{data_uri} is an uncurated captions.jsonl folder with no splits: evaluate it with --split all")
        return load_raw_folder(data_uri)
    es, manifest = load_split(data_uri, split, cfg.max_samples, model_data_uri=_trained_on(meta))
    return es, hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _retrieval(temb: np.ndarray, iemb: np.ndarray, es: EvalSet, cfg: EvalConfig) -> tuple[dict, list[list[int]]]:
    """Retrieval metrics with recall@K curves and their random floors, and the top images of the example queries."""
    rel = es.relevance()
    r = retrieval_metrics(temb, iemb, rel, ks=cfg.recall_ks, ties=cfg.ties)
    sim = r.pop("sim")
    for d, q, g in (("t2i", sim, rel), ("i2t", sim.T, rel.T)):
        r[d].pop("per_query")
        r[d]["curve"] = recall_curve(q, g, max_k=min(50, q.shape[1]), ties=cfg.ties)
        chance = chance_recall(g, ks=range(1, len(r[d]["curve"]) + 1))
        r[d]["chance_curve"] = [chance[f"R@{k}"] for k in range(1, len(r[d]["curve"]) + 1)]
    r["images"], r["texts"] = len(es.images), len(es.texts)
    top = [list(np.argsort(-sim[i], kind="stable")[:5]) for i in range(min(cfg.num_examples, len(es.texts)))]
    return r, top


def _examples(es: EvalSet, preds: list[str], top_images: list[list[int]], n: int) -> dict:
    rel = es.relevance() if top_images else None
    return {
        "captions": [{"image": i, "key": es.image_keys[i], "prediction": preds[i], "references": es.references[i]}
                     for i in range(min(n, len(preds)))],
        "queries": [{"text": es.texts[q], "top_images": [int(i) for i in top],
                     "relevant": [int(i) for i in np.flatnonzero(rel[q])]} for q, top in enumerate(top_images)],
    }


def summarize(doc: dict, out_uri: str) -> tuple[dict, str]:
    """``(summary for --json, human text)`` of an evaluation: headline metrics, the gate decision, the report path."""
    metrics = {k: v["value"] for k, v in doc["metrics"].items()}
    report = storage.join(out_uri, "report.html")
    summary: dict[str, Any] = {"out": out_uri, "split": doc["data"]["split"], "samples": doc["data"]["samples"],
                               "metrics": metrics, "report": report}
    if "gate" in doc:
        summary["gate"] = {k: doc["gate"][k] for k in ("decision", "reason", "first_model")}
    lines = [f"evaluated {doc['model']['checkpoint']} on {doc['data']['split']} "
             f"({doc['data']['samples']} samples) in {doc['timing_s']['total_s']:.1f}s"]
    for k in ("retrieval.t2i.R@1", "retrieval.i2t.R@1", "retrieval.mean_recall", "retrieval.chance_mean_recall",
              "retrieval.mean_recall_lift", "captioning.bleu4", "captioning.cider_d", "lm.text.perplexity",
              "lm.caption.perplexity", "moe.load_cv", "moe.drop_rate"):
        if k in metrics:
            lines.append(f"  {k:30s} {metrics[k]:.4f}")
    if "gate" in doc:
        lines.append(f"gate: {doc['gate']['decision'].upper()} — {doc['gate']['reason']}")
    lines.append(f"report: {report}")
    return summary, "\n".join(lines)


def write_outputs(doc: dict, es: EvalSet, out_uri: str, train_rows: list[dict]) -> None:
    """``eval.json``, ``metrics.json`` (KFP Metrics), ``gate.json`` (with a gate decision) and ``report.html``."""
    from m6.eval.report import render_html

    storage.write_json(storage.join(out_uri, "eval.json"), _jsonable(doc))
    storage.write_json(storage.join(out_uri, "metrics.json"), kfp_metrics(doc["metrics"]))
    if "gate" in doc:  # the decision alone, for a pipeline step that only branches on it
        storage.write_json(storage.join(out_uri, "gate.json"), _jsonable(doc["gate"]))
    storage.write_text(storage.join(out_uri, "report.html"), render_html(doc, es, train_rows))
    log.info("wrote eval.json, metrics.json and report.html to %s", out_uri)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x
