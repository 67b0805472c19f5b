"""Shard writer/reader, key-hash split, tokenizer round trips, the synthetic corpus."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from datakit import jpeg

from m6 import storage
from m6.config import SPECIAL_TOKENS
from m6.data.shards import ShardWriter, heldout_key, iter_shard, sample_split, split_of, verify_shard
from m6.data.synth import is_heldout, synthesize
from m6.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def _samples(n):
    for i in range(n):
        yield {"__key__": f"k{i:04d}", "jpg": jpeg(shape=i), "txt": f"caption {i} 中文 {i}",
               "json": {"kind": "image", "i": i}}


def test_shards_roll_over_by_count_and_read_back_in_order(tmp_path):
    w = ShardWriter(str(tmp_path), max_samples=7, max_bytes=1 << 30)
    for s in _samples(20):
        w.write(s)
    shards = w.close()
    assert [s["samples"] for s in shards] == [7, 7, 6]
    got = [s for sh in shards for s in iter_shard(storage.join(str(tmp_path), sh["name"]))]
    assert [g["__key__"] for g in got] == [f"k{i:04d}" for i in range(20)]
    assert got[3]["txt"] == "caption 3 中文 3" and got[3]["json"] == {"kind": "image", "i": 3}
    assert got[3]["jpg"] == jpeg(shape=3)
    assert all(verify_shard(storage.join(str(tmp_path), sh["name"]), sh) for sh in shards)


def test_shards_roll_over_by_bytes(tmp_path):
    w = ShardWriter(str(tmp_path), max_samples=1000, max_bytes=4096)
    for s in _samples(10):
        w.write(s)
    shards = w.close()
    assert len(shards) > 2 and sum(s["samples"] for s in shards) == 10


def test_shards_are_readable_by_the_webdataset_library(tmp_path):
    import webdataset as wds

    w = ShardWriter(str(tmp_path), max_samples=5, max_bytes=1 << 30)
    for s in _samples(8):
        w.write(s)
    names = [s["name"] for s in w.close()]
    ds = wds.WebDataset([str(tmp_path / n) for n in names], shardshuffle=False).decode("pil")
    got = list(ds)
    assert [g["__key__"] for g in got] == [f"k{i:04d}" for i in range(8)]
    assert got[0]["jpg"].size == (64, 48) and got[0]["txt"] == "caption 0 中文 0" and got[0]["json"]["i"] == 0


def test_shard_bytes_are_reproducible(tmp_path):
    shas = []
    for d in ("a", "b"):
        w = ShardWriter(str(tmp_path / d), max_samples=100, max_bytes=1 << 30)
        for s in _samples(3):
            w.write(s)
        shas.append(w.close()[0]["sha256"])
    assert shas[0] == shas[1]


def test_keys_with_dots_are_rejected(tmp_path):
    w = ShardWriter(str(tmp_path), max_samples=10, max_bytes=1 << 30)
    with pytest.raises(ValueError, match="must not contain"):
        w.write({"__key__": "a.b", "txt": "x"})


def test_split_is_deterministic_and_follows_the_fractions():
    keys = [f"key-{i}" for i in range(20000)]
    c = Counter(split_of(k, 0.1, 0.05) for k in keys)
    assert abs(c["val"] / 20000 - 0.1) < 0.01 and abs(c["test"] / 20000 - 0.05) < 0.01
    assert [split_of(k, 0.1, 0.05) for k in keys[:50]] == [split_of(k, 0.1, 0.05) for k in keys[:50]]
    assert sample_split({"__key__": "x", "json": {"heldout": True}}, 0.1, 0.05) == "test"
    for k in keys[:200]:
        hk = heldout_key(k, 0.1, 0.05)
        assert hk.startswith(k + "-h") and split_of(hk, 0.1, 0.05) == "test"


def test_tokenizer_round_trips_chinese_and_english_with_fixed_special_ids(tmp_path):
    texts = ["a small red striped star on the left", "白色背景上左边的一个小橙色波点方块",
             "圣诞 抱枕 ins风 北欧", "product photo of a large polka-dot square in purple"] * 30
    tok = train_tokenizer(texts, vocab_size=400)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    for s in texts[:4] + ["未见过的字：龘靐 and unseen words ✓"]:
        assert tok.decode(tok.encode(s).ids) == s
    assert len(tok.encode("白色背景上左边的").ids) < len("白色背景上左边的".encode("utf-8"))  # merges learned
    save_tokenizer(tok, str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(texts[1]).ids == tok.encode(texts[1]).ids


def test_synth_is_deterministic_and_records_dirt_and_heldout(tmp_path):
    a = synthesize(str(tmp_path / "a"), n=80, seed=5, n_text=20, dirt_rate=0.3)
    synthesize(str(tmp_path / "b"), n=80, seed=5, n_text=20, dirt_rate=0.3)
    assert (tmp_path / "a" / "captions.jsonl").read_bytes() == (tmp_path / "b" / "captions.jsonl").read_bytes()
    assert (tmp_path / "a" / "images" / "000001.jpg").read_bytes() == (tmp_path / "b" / "images" / "000001.jpg").read_bytes()
    assert 10 <= a["dirty_items"] <= 50
    info = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert sum(info["dirt_by_kind"].values()) == a["dirty_items"]
    recs = []
    for line in (tmp_path / "a" / "captions.jsonl").read_bytes().splitlines():
        try:
            recs.append(json.loads(line.decode("utf-8")))
        except ValueError:  # the injected non-UTF-8 and malformed lines
            pass
    assert len(recs) < 80
    for r in recs:
        if "attributes" in r and r["image"] not in info["dirt"]:
            from m6.data.synth import COLORS, KINDS

            k = [x[0] for x in KINDS].index(r["attributes"]["kind"])
            c = [x[0] for x in COLORS].index(r["attributes"]["color"])
            assert r["heldout"] == is_heldout(k, c)


def test_synth_rejects_unknown_language(tmp_path):
    with pytest.raises(ValueError, match="unknown language"):
        synthesize(str(tmp_path), n=5, langs=["fr"])


def test_a_damaged_shard_is_named_in_the_error(tmp_path):
    from m6.errors import UserError

    w = ShardWriter(str(tmp_path), max_samples=100, max_bytes=1 << 30)
    for s in _samples(4):
        w.write(s)
    name = w.close()[0]["name"]
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{name}: damaged shard"):
        list(iter_shard(str(tmp_path / name)))
