"""End to end on real data: the MUGE sample (8 Taobao images, 2 Chinese queries), raw and curated."""

from __future__ import annotations

import json
import shutil

from m6 import storage
from m6.config import preset
from m6.eval.run import evaluate


def test_muge_sample_gallery_with_distractors_runs_end_to_end(trained, shared_data, tmp_path):
    muge = shared_data / "muge-sample"
    lines = [json.loads(x) for x in (muge / "captions.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    doc = evaluate("trained", str(muge), str(tmp_path), loaded=trained, split="all", gate=True)
    data = doc["data"]
    assert data["images"] == len(lines) == 8 and data["dropped"] == {}
    assert data["texts"] == len({x["query"] for x in lines if x["ground_truth_match"]}) == 2
    r = doc["retrieval"]
    assert r["t2i"]["queries"] == 2 and r["i2t"]["queries"] == sum(x["ground_truth_match"] for x in lines)
    # the model never saw Chinese product photos: numbers are what they are, but every one is a number in range
    for name in ("retrieval.t2i.R@1", "retrieval.t2i.R@5", "retrieval.t2i.R@10", "retrieval.muge_mr"):
        assert 0.0 <= doc["metrics"][name]["value"] <= 1.0
    assert doc["metrics"]["retrieval.t2i.R@10"]["value"] == 1.0  # 8 candidates: every match is in the top 10
    assert doc["captioning"]["images"] == 5  # distractors have no reference caption
    assert "lm.caption.perplexity" in doc["metrics"]
    page = storage.read_text(storage.join(str(tmp_path), "report.html"))
    assert "圣诞 抱枕" in page and "32不粘锅" in page
    assert doc["gate"]["decision"] in ("promote", "hold")


def test_muge_sample_curated_then_evaluated(trained, shared_data, tmp_path):
    from m6.data.curate import curate

    # The sample lists bare file names and keeps its images under images/; give curation paths relative to the file.
    src = tmp_path / "raw"
    shutil.copytree(shared_data / "muge-sample" / "images", src / "images")
    lines = [json.loads(x) for x in (shared_data / "muge-sample" / "captions.jsonl").read_text(encoding="utf-8").splitlines()
             if x.strip()]
    (src / "captions.jsonl").write_text(
        "\n".join(json.dumps({**x, "image": f"images/{x['image']}"}, ensure_ascii=False) for x in lines) + "\n",
        encoding="utf-8")
    cfg = preset("tiny").data
    stats = curate([str(src)], str(tmp_path / "cur"), cfg)
    assert stats["kept"] == 5 and stats["dropped"]["caption_missing"] == 3
    doc = evaluate("trained", str(tmp_path / "cur"), str(tmp_path / "eval"), loaded=trained, split="all")
    assert doc["data"]["images"] == 5 and doc["data"]["texts"] == 2
    # split "all" of a dataset the model never trained on: its train-split samples are admitted, and counted
    from m6.data.shards import iter_dataset

    in_train = sum(1 for _ in iter_dataset(str(tmp_path / "cur"), "train"))
    assert doc["data"]["overlap_check"]["train_samples_admitted"] == in_train
    assert all(0.0 <= v["value"] <= 1.0 for k, v in doc["metrics"].items() if "R@" in k)
