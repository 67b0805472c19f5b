"""End-to-end evaluation of tiny models on a curated-format dataset: chance level, learned, outputs, held-out split."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from m6 import storage
from m6.config import EvalConfig, preset
from m6.data.shards import iter_dataset, split_of
from m6.errors import UserError
from m6.eval.run import evaluate


@pytest.fixture(scope="module")
def random_model(eval_data):
    from m6.data.tokenizer import load_tokenizer
    from m6.model.m6 import M6Model

    torch.manual_seed(7)
    tok = load_tokenizer(eval_data)
    cfg = preset("tiny")
    cfg.model.vocab_size = tok.get_vocab_size()
    return M6Model(cfg.model), cfg, tok, {"checkpoint": "random-init", "step": 0}


@pytest.fixture(scope="module")
def random_eval(random_model, eval_data, tmp_path_factory):
    return evaluate("random-init", eval_data, str(tmp_path_factory.mktemp("rand")), loaded=random_model)


@pytest.fixture(scope="module")
def trained_eval(trained, eval_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained"))
    return evaluate("trained", eval_data, out, loaded=trained, gate=True), out


def _v(doc, name):
    return doc["metrics"][name]["value"]


def test_random_model_sits_at_chance(random_eval, random_model):
    vocab = random_model[1].model.vocab_size
    assert 0.6 < _v(random_eval, "retrieval.mean_recall_lift") < 1.4
    chance = random_eval["retrieval"]["chance"]["t2i"]["R@1"]
    assert _v(random_eval, "retrieval.t2i.R@1") < 3 * chance
    # an untrained LM spreads its mass over the vocabulary: perplexity of the order of |V|
    assert vocab / 3 < _v(random_eval, "lm.caption.perplexity") < 3 * vocab
    assert _v(random_eval, "captioning.cider_d") < 0.2


def test_trained_model_is_clearly_above_chance(trained_eval, random_eval):
    doc, _ = trained_eval
    assert _v(doc, "retrieval.mean_recall_lift") > 2.0
    assert _v(doc, "retrieval.mean_recall") > 2 * _v(random_eval, "retrieval.mean_recall")
    assert _v(doc, "lm.caption.perplexity") < _v(random_eval, "lm.caption.perplexity") / 20
    assert _v(doc, "captioning.cider_d") > _v(random_eval, "captioning.cider_d") + 0.5
    assert _v(doc, "captioning.bleu4") > 0.1


def test_every_metric_carries_split_samples_and_checkpoint(trained_eval, trained):
    doc, out = trained_eval
    saved = storage.read_json(storage.join(out, "eval.json"))
    assert saved["schema"] == "m6.eval/v1"
    assert saved["data"]["split"] == "test" and saved["data"]["samples"] > 0
    for name, m in saved["metrics"].items():
        assert m["split"] == "test" and m["samples"] > 0 and m["checkpoint"] == trained[3]["checkpoint"], name
    assert saved["moe"] and len(saved["moe"][0]["tokens_per_expert"]) == preset("tiny").model.num_experts
    assert saved["text_to_image"] is None


def test_kfp_metrics_have_legal_names_and_match_eval_json(trained_eval):
    doc, out = trained_eval
    kfp = storage.read_json(storage.join(out, "metrics.json"))
    names = [m["name"] for m in kfp["metrics"]]
    assert len(names) == len(set(names)) == len(doc["metrics"])
    for m in kfp["metrics"]:
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,62}[a-z0-9])?", m["name"]), m["name"]
        assert m["format"] in ("RAW", "PERCENTAGE")
    by_name = {m["name"]: m["numberValue"] for m in kfp["metrics"]}
    assert by_name["retrieval-t2i-r-at-1"] == pytest.approx(_v(doc, "retrieval.t2i.R@1"))


def test_report_embeds_plots_examples_and_the_gate_decision(trained_eval):
    doc, out = trained_eval
    page = storage.read_text(storage.join(out, "report.html"))
    assert page.count("data:image/png;base64,") >= 2 + len(doc["examples"]["captions"])
    for section in ("Retrieval", "MoE health", "Training loss", "Image → generated caption", "Text query → top images"):
        assert section in page
    assert doc["gate"]["decision"] in ("promote", "hold") and html.escape(doc["gate"]["reason"]) in page
    assert storage.read_json(storage.join(out, "gate.json"))["decision"] == doc["gate"]["decision"]


def test_evaluated_samples_never_come_from_the_training_split(trained_eval, eval_data):
    doc, _ = trained_eval
    manifest = storage.read_json(storage.join(eval_data, "manifest.json"))
    val, test = manifest["split"]["val_fraction"], manifest["split"]["test_fraction"]
    keys = {ex["key"] for ex in doc["examples"]["captions"]}
    assert keys and all(split_of(k, val, test) == "test" for k in keys)
    train_keys = {s["__key__"] for s in iter_dataset(eval_data, "train")}
    assert not keys & train_keys
    check = doc["data"]["overlap_check"]
    assert check["train_samples_admitted"] == 0
    # held-out items whose key hashes into training are excluded (a key-hash reader would train on them)
    heldout = [s["__key__"] for s in iter_dataset(eval_data, "test") if s["json"].get("heldout")]
    hashed_train = [k for k in heldout if split_of(k, val, test) == "train"]
    assert hashed_train and check["excluded_key_hash_train"] == len(hashed_train)
    assert doc["data"]["samples"] == check["samples_seen_by_split"]["test"] - len(hashed_train)


def test_training_split_and_own_training_data_are_refused(trained, eval_data, tmp_path):
    with pytest.raises(UserError, match="training split is never evaluated"):
        evaluate("trained", eval_data, str(tmp_path), loaded=trained, split="train")
    with pytest.raises(UserError, match="trained on"):
        evaluate("trained", eval_data, str(tmp_path), loaded=trained, split="all")


def test_perplexity_is_reproducible(trained, eval_data, tmp_path):
    cfg = EvalConfig(max_samples=20)
    a = evaluate("trained", eval_data, str(tmp_path / "a"), loaded=trained, cfg=cfg)
    b = evaluate("trained", eval_data, str(tmp_path / "b"), loaded=trained, cfg=cfg)
    assert a["lm"] == b["lm"]
    assert a["data"]["samples"] == 20


def test_gate_promotes_first_model_then_holds_an_equal_one(trained, eval_data, tmp_path):
    cfg = EvalConfig(max_samples=30)
    first = evaluate("trained", eval_data, str(tmp_path / "champ"), loaded=trained, cfg=cfg, gate=True,
                     champion_uri=str(tmp_path / "nothing-deployed"))
    assert first["gate"]["decision"] == "promote" and first["gate"]["first_model"]
    again = evaluate("trained", eval_data, str(tmp_path / "cand"), loaded=trained, cfg=cfg, gate=True,
                     champion_uri=str(tmp_path / "champ"))
    assert again["gate"]["decision"] == "hold" and "did not improve" in again["gate"]["reason"]
    assert again["gate"]["comparable"] is True


def test_reads_data_from_and_writes_results_to_s3(trained, eval_data, s3_env):
    from m6.storage import ensure_bucket, split_s3

    ensure_bucket(split_s3(s3_env + "/x")[0])
    storage.upload_dir(eval_data, f"{s3_env}/ds")
    doc = evaluate("trained", f"{s3_env}/ds", f"{s3_env}/eval", loaded=trained, cfg=EvalConfig(max_samples=16))
    saved = json.loads(storage.read_bytes(f"{s3_env}/eval/eval.json"))
    assert saved["metrics"].keys() == doc["metrics"].keys()
    assert storage.exists(f"{s3_env}/eval/report.html") and storage.exists(f"{s3_env}/eval/metrics.json")


def test_broken_samples_are_dropped_and_counted(random_model, tmp_path):
    import io

    from PIL import Image

    from m6.data.shards import SCHEMA, ShardWriter

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="JPEG")
    good = buf.getvalue()
    w = ShardWriter(str(tmp_path / "ds"), max_samples=100, max_bytes=1 << 20)
    samples = [("a", good, "a red square"), ("b", good[: len(good) // 3], "a truncated file"),
               ("c", b"not an image at all", "junk bytes"), ("d", good, "")]
    for key, img, cap in samples:
        w.write({"__key__": key, "jpg": img, "txt": cap, "json": {"split": "test"}})
    w.write({"__key__": "e", "txt": "", "json": {"kind": "text", "split": "test"}})
    storage.write_json(str(tmp_path / "ds" / "manifest.json"),
                       {"schema": SCHEMA, "shards": w.close(), "num_samples": 5,
                        "split": {"method": "test", "val_fraction": 0.0, "test_fraction": 1.0}})
    doc = evaluate("random", str(tmp_path / "ds"), str(tmp_path / "out"), loaded=random_model)
    d = doc["data"]
    assert d["samples"] == 5 and d["images"] == 1
    assert d["dropped"] == {"undecodable image": 2, "image without caption": 1, "text sample without text": 1}


def test_raw_folder_counts_malformed_lines_and_missing_images(random_model, tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 10, 200)).save(buf, format="PNG")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(buf.getvalue())
    (tmp_path / "captions.jsonl").write_text(
        '{"image": "1.png", "captions": ["蓝色 方块"]}\n{"image": "2.png", "captions": ["x"]}\nnot json\n', encoding="utf-8")
    doc = evaluate("random", str(tmp_path), str(tmp_path / "out"), loaded=random_model, split="all")
    assert doc["data"]["images"] == 1
    assert doc["data"]["dropped"] == {"image file missing": 1, "malformed captions.jsonl line": 1}
    with pytest.raises(UserError, match="--split all"):
        evaluate("random", str(tmp_path), str(tmp_path / "out2"), loaded=random_model)


def test_beam_search_captions_are_scored_too(trained, eval_data, tmp_path):
    greedy = evaluate("trained", eval_data, str(tmp_path / "g"), loaded=trained, cfg=EvalConfig(max_samples=8))
    beam = evaluate("trained", eval_data, str(tmp_path / "b"), loaded=trained,
                    cfg=EvalConfig(max_samples=8, caption_method="beam"))
    assert beam["config"]["caption_method"] == "beam"
    assert beam["captioning"]["images"] == greedy["captioning"]["images"] > 0
    assert all(ex["prediction"] for ex in beam["examples"]["captions"])


def test_text_only_dataset_gets_perplexity_and_a_held_gate(random_model, tmp_path):
    from m6.data.shards import SCHEMA, ShardWriter

    w = ShardWriter(str(tmp_path / "ds"), max_samples=100, max_bytes=1 << 20)
    for i in range(6):
        w.write({"__key__": f"t{i}", "txt": f"a plain red circle number {i} on a white background",
                 "json": {"kind": "text", "split": "test"}})
    storage.write_json(str(tmp_path / "ds" / "manifest.json"),
                       {"schema": SCHEMA, "shards": w.close(), "num_samples": 6,
                        "split": {"method": "test", "val_fraction": 0.0, "test_fraction": 1.0}})
    doc = evaluate("random", str(tmp_path / "ds"), str(tmp_path / "out"), loaded=random_model, gate=True)
    assert set(doc["metrics"]) >= {"lm.text.perplexity"} and "retrieval" not in doc and "captioning" not in doc
    assert doc["lm"]["text"]["samples"] == 6
    assert doc["gate"]["decision"] == "hold" and "missing" in doc["gate"]["reason"]
    assert storage.exists(str(tmp_path / "out" / "report.html"))
