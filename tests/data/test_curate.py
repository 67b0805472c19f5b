"""The curation job end to end: outputs, determinism across worker counts, resume, S3 with a failure mid-upload, real data."""

from __future__ import annotations

import json

import pytest
from datakit import FaultyS3Proxy, small_cfg

from m6 import storage
from m6.cli import main
from m6.data import sources
from m6.data.curate import curate
from m6.data.shards import iter_dataset, read_manifest, shard_uris, split_of, verify_shard
from m6.data.sources import discover
from m6.data.synth import synthesize
from m6.data.tokenizer import load_tokenizer
from m6.data.worker import part_uris, process_partition
from m6.errors import UserError


def _invariant(stats: dict) -> None:
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["read"]


def test_synthetic_corpus_curates_into_a_complete_dataset(synth_dir, tmp_path):
    out = str(tmp_path / "ds")
    stats = curate([synth_dir], out, small_cfg())
    _invariant(stats)
    info = storage.read_json(synth_dir + "/synth.json")
    assert stats["read"] == info["items"] + info["text_docs"]
    assert stats["dropped_total"] > 0.1 * stats["read"]  # a quarter of the items were dirtied
    m = read_manifest(out)
    assert m["schema"] == "m6.shards/v1" and m["num_samples"] == stats["kept"] == sum(s["samples"] for s in m["shards"])
    assert sum(m["split"]["counts"].values()) == stats["kept"] and m["tokenizer"] == "tokenizer.json"
    assert all(verify_shard(u, s) for u, s in zip(shard_uris(out, m), m["shards"]))
    samples = list(iter_dataset(out))
    assert len({s["__key__"] for s in samples}) == len(samples)
    for s in samples:
        assert s["json"]["kind"] in ("image", "text") and s["txt"]
        if s["json"]["kind"] == "image":
            assert min(s["json"]["size"]) == 32 and "jpg" in s
        assert s["json"]["split"] == split_of(s["__key__"], 0.05, 0.05)
        if s["json"].get("heldout"):
            assert s["json"]["split"] == "test"
    assert {s["json"]["lang"] for s in samples} == {"en", "zh"}
    assert any(s["json"].get("heldout") for s in samples)
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode(samples[0]["txt"]).ids) == samples[0]["txt"]
    html = storage.read_text(out + "/report.html")
    assert "dup_image_exact" in html and html.count("data:image/jpeg;base64") > 10 and "data:image/png" in html
    assert storage.is_complete(out) and not storage.exists(out + "/_work/part-00000.json")


def test_two_workers_give_the_same_shards_as_one(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LINES_PER_PARTITION", 40)
    a = curate([synth_dir], str(tmp_path / "a"), small_cfg(workers=1))
    b = curate([synth_dir], str(tmp_path / "b"), small_cfg(workers=2))
    ma, mb = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "b"))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert a["dropped"] == b["dropped"]


def test_rerun_after_a_crash_resumes_verified_partitions(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LINES_PER_PARTITION", 40)
    cfg = small_cfg()
    clean = curate([synth_dir], str(tmp_path / "clean"), cfg)
    out = str(tmp_path / "crashed")
    parts = discover([synth_dir])
    assert len(parts) >= 4
    work = out + "/_work"
    for p in parts[:3]:  # what a run that crashed during the 4th partition leaves behind
        process_partition(p, cfg, work)
    tar_uri, _ = part_uris(work, 2)
    data = storage.read_bytes(tar_uri)
    storage.write_bytes(tar_uri, data[: len(data) // 2])  # partition 2's tar got cut: it must be redone
    stats = curate([synth_dir], out, cfg)
    assert stats["resumed_partitions"] == 2
    assert [s["sha256"] for s in read_manifest(out)["shards"]] == [s["sha256"] for s in read_manifest(str(tmp_path / "clean"))["shards"]]
    assert stats["dropped"] == clean["dropped"]
    again = curate([synth_dir], out, cfg)  # completed shards are verified and kept, not rewritten
    assert again["reused_shards"] == again["shards"]


def test_s3_curation_survives_a_failure_mid_upload_and_resumes(s3_env, s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LINES_PER_PARTITION", 16)
    src, out = s3_env + "/raw", s3_env + "/curated"
    synthesize(src, n=48, seed=7, n_text=12, dirt_rate=0.2)
    local = curate([src], str(tmp_path / "local"), small_cfg())
    proxy = FaultyS3Proxy(s3_server, budget_bytes=120_000)
    monkeypatch.setenv("M6_S3_ENDPOINT", proxy.endpoint)
    monkeypatch.setenv("M6_S3_RETRIES", "2")
    with pytest.raises(storage.StorageError, match="s3://"):
        curate([src], out, small_cfg())
    assert proxy.cuts >= 1
    proxy.heal()
    assert not storage.is_complete(out)
    stats = curate([src], out, small_cfg(workers=2))  # forked workers open their own S3 connections
    _invariant(stats)
    assert stats["resumed_partitions"] >= 1
    assert stats["kept"] == local["kept"] and stats["dropped"] == local["dropped"]
    remote_keys = [s["__key__"] for s in iter_dataset(out)]
    assert remote_keys == [s["__key__"] for s in iter_dataset(str(tmp_path / "local"))]
    assert storage.is_complete(out) and load_tokenizer(out + "/tokenizer.json").get_vocab_size() > 256
    proxy.close()


def test_cli_synth_then_curate_prints_summaries(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "raw"), "--n", "40", "--seed", "2", "--json"]) == 0
    synth = json.loads(capsys.readouterr().out)
    assert synth["items"] == 40 and synth["text_docs"] == 10
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"data": {"image_size": 32, "tokenizer_vocab_size": 400}}))
    assert main(["curate", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"), "--config", str(cfg),
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["read"] == 50 and stats["kept"] + stats["dropped_total"] == 50
    assert main(["curate", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds2")]) == 0
    assert "kept" in capsys.readouterr().out


def test_cli_reports_bad_input_and_bad_config_in_one_line(tmp_path, capsys):
    assert main(["curate", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "missing: does not exist" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"data": {"min_sidе": 3}}))
    assert main(["curate", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "unknown config key data.min_sid" in capsys.readouterr().err


def test_real_taobao_images_and_cococn_captions(shared_data, tmp_path):
    muge = shared_data / "muge-sample"
    cococn = shared_data / "coco-cn-text" / "imageid.manually-translated-caption.txt"
    stats = curate([str(muge), str(cococn)], str(tmp_path / "real"), small_cfg(image_size=64))
    _invariant(stats)
    assert stats["by_input"][0]["read"] == 8 and stats["by_input"][0]["kept"] == 5
    assert stats["dropped"]["caption_missing"] == 3  # the 3 non-matching images carry no caption
    assert stats["by_input"][1]["read"] == 5000 and stats["by_input"][1]["kept"] > 4000
    images = [s for s in iter_dataset(str(tmp_path / "real")) if s["json"]["kind"] == "image"]
    assert {s["txt"] for s in images} <= {"圣诞 抱枕", "北欧 风格 台灯"} or all(s["json"]["lang"] == "zh" for s in images)
    assert all(s["json"]["orig_size"] == [224, 224] and s["json"]["size"] == [64, 64] for s in images)


DIRT_REASON = {
    "missing_file": "image_missing", "zero_byte": "image_empty", "truncated": "image_truncated",
    "corrupt": "image_corrupt", "not_image": "image_not_image", "tiny": "image_too_small",
    "extreme_aspect": "image_aspect_ratio", "exact_dup": "dup_image_exact", "near_dup": "dup_image_near",
    "malformed_json": "record_malformed", "non_utf8": "caption_not_utf8", "no_caption_key": "caption_missing",
    "empty_caption": "caption_empty", "filename_caption": "caption_filename", "number_caption": "caption_number",
    "url_caption": "caption_url", "blocklisted": "caption_blocklisted", "zh_not_chinese": "caption_low_cjk",
    "text_exact_dup": "dup_text_exact", "text_near_dup": "dup_text_near", "text_empty": "caption_empty",
    "text_number": "caption_number", "text_blocklisted": "caption_blocklisted",
}


def test_each_kind_of_injected_dirt_is_dropped_under_its_reason_and_html_is_cleaned(synth_dir, tmp_path):
    stats = curate([synth_dir], str(tmp_path / "ds"), small_cfg())
    info = storage.read_json(synth_dir + "/synth.json")
    expected: dict[str, int] = {}
    for kind, n in info["dirt_by_kind"].items():
        if kind in DIRT_REASON:
            expected[DIRT_REASON[kind]] = expected.get(DIRT_REASON[kind], 0) + n
    got = {r: n for r, n in stats["dropped"].items() if n}
    assert got == expected
    assert stats["modified"]["html_stripped"] >= info["dirt_by_kind"].get("html_caption", 0) > 0


def test_unreachable_s3_input_is_a_named_run_level_error(s3_env, monkeypatch, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("M6_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("M6_S3_RETRIES", "2")
    with pytest.raises(UserError, match=f"input {s3_env}/raw: cannot be read"):
        curate([s3_env + "/raw"], str(tmp_path / "out"), small_cfg())
