"""Every source type, curated with dirty inputs: reasons counted, kept + Σ dropped == read, run-level errors named."""

from __future__ import annotations

import base64
import json

import pytest
from datakit import jpeg, small_cfg

from m6.config import ConfigError, from_dict, DataConfig
from m6.data.curate import curate
from m6.data.shards import iter_dataset, read_manifest
from m6.data.sources import discover
from m6.errors import UserError


def _invariant(stats: dict) -> None:
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["read"]
    assert stats["dropped_total"] == sum(stats["dropped"].values())


def _nonzero(stats: dict) -> dict:
    return {r: n for r, n in stats["dropped"].items() if n}


def test_webdataset_tars_with_dirt_and_a_truncated_tar(wds_dir, tmp_path):
    src, expected = wds_dir
    stats = curate([src], str(tmp_path / "out"), small_cfg())
    _invariant(stats)
    assert stats["read"] == 12 + 4  # a.tar: 12 samples; b.tar: 3 whole + 1 cut
    assert _nonzero(stats) == expected
    kept = list(iter_dataset(str(tmp_path / "out")))
    assert len(kept) == stats["kept"] == 11
    webp_sample = next(s for s in kept if s["json"].get("source_key") == "webp1")
    assert webp_sample["json"]["lang"] == "zh" and webp_sample["json"]["orig_size"] == [56, 40]
    png_sample = next(s for s in kept if s["json"].get("source_key") == "png1")
    assert png_sample["txt"] == "a green square on clear background" and png_sample["json"]["url"] == "http://x"


def test_imagefolder_with_several_captions_and_langs(tmp_path):
    d = tmp_path / "folder"
    (d / "img").mkdir(parents=True)
    lines = []
    for i in range(5):
        (d / "img" / f"{i}.jpg").write_bytes(jpeg(shape=i * 3, color=(30 * i, 100, 150)))
        lines.append(json.dumps({"image": f"img/{i}.jpg", "captions": [f"a cup number {i}", f"杯子 {i} 号"], "lang": "en"}))
    lines.append(json.dumps({"image": "img/missing.jpg", "caption": "nothing here"}))
    lines.append(json.dumps({"image": "img/0.jpg"}))                    # no caption key
    lines.append('{"image": "img/1.jpg", "caption": ')                  # malformed
    lines.append(json.dumps({"image": "img/2.jpg", "caption": "红色杯子", "lang": "zh"}, ensure_ascii=False)
                 .replace("红色杯子", "\udcff"))
    (d / "captions.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    stats = curate([str(d)], str(tmp_path / "out"), small_cfg())
    _invariant(stats)
    assert stats["read"] == 9
    assert _nonzero(stats) == {"image_missing": 1, "caption_missing": 1, "record_malformed": 1, "caption_not_utf8": 1}
    s = next(iter_dataset(str(tmp_path / "out")))
    assert s["json"]["captions"] == ["a cup number 0", "杯子 0 号"] and s["txt"] == "a cup number 0"


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"key": [r[0] for r in rows], "jpg": pa.array([r[1] for r in rows], pa.binary()),
                  "caption": [r[2] for r in rows], "status": ["success"] * len(rows)})
    pq.write_table(t, path, row_group_size=3)


def test_parquet_in_the_img2dataset_layout(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    rows = [(f"{i:05d}", jpeg(shape=i, color=(10, 20 * i, 200)), f"a photo of item {i}") for i in range(6)]
    rows += [("00006", None, "image failed to download"), ("00007", b"\x00\x01junk", "junk bytes"),
             ("00008", jpeg(shape=30), None), ("00009", jpeg(shape=31), "9999")]
    _parquet(d / "part-0.parquet", rows)
    stats = curate([str(d)], str(tmp_path / "out"), small_cfg())
    _invariant(stats)
    assert stats["read"] == 10
    assert _nonzero(stats) == {"image_missing": 1, "image_not_image": 1, "caption_missing": 1, "caption_number": 1}


def test_muge_tsv_joined_to_its_texts(tmp_path):
    d = tmp_path / "muge"
    d.mkdir()
    tsv = [f"{100 + i}\t{base64.b64encode(jpeg(shape=i, color=(200, 10 * i, 10))).decode()}" for i in range(5)]
    tsv += ["105\t!!!notbase64", "106", f"107\t{base64.b64encode(jpeg(shape=9)).decode()}"]
    (d / "valid_imgs.tsv").write_text("\n".join(tsv) + "\n")
    texts = [{"query_id": 1, "query_text": "圣诞 抱枕", "item_ids": [100, 101]},
             {"query_id": 2, "query_text": "北欧 风格 台灯", "item_ids": [102, 103, 104, 105]}]
    (d / "valid_texts.jsonl").write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + "\n")
    stats = curate([str(d)], str(tmp_path / "out"), small_cfg())
    _invariant(stats)
    assert stats["read"] == 8
    assert _nonzero(stats) == {"image_corrupt": 1, "record_malformed": 1, "caption_missing": 1}
    langs = {s["json"]["lang"] for s in iter_dataset(str(tmp_path / "out"))}
    assert langs == {"zh"}


def test_text_corpora_txt_jsonl_and_cococn_style(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    docs = ["The red cup holds hot tea and keeps it warm for hours.", "一只黄色的小狗趴在长椅上晒太阳。"]
    (d / "docs.txt").write_bytes(("\n".join(docs + ["", "12345678", docs[0]]) + "\n").encode() + b"\xff\xfe bad\n")
    (d / "docs.jsonl").write_text("\n".join([json.dumps({"text": "<div>A blue lamp for the desk, bright and small.</div>"}),
                                             json.dumps({"title": "no text field"}), "{broken"]) + "\n")
    (d / "caps.txt").write_text("COCO_1#0\t两只黑色的狗从水里翻着水花游过来\nCOCO_1#1\t机场跑道的喷气式飞机正准备起飞。\n")
    stats = curate([str(d)], str(tmp_path / "out"), small_cfg())
    _invariant(stats)
    assert stats["read"] == 5 + 3 + 2  # blank line is not a document
    assert _nonzero(stats) == {"caption_number": 1, "dup_text_exact": 1, "caption_not_utf8": 1,
                               "caption_missing": 1, "record_malformed": 1}
    assert stats["modified"]["html_stripped"] == 1
    keys = {s["__key__"] for s in iter_dataset(str(tmp_path / "out"))}
    assert any(k.endswith("COCO_1_0") for k in keys)
    assert all(s["json"]["kind"] == "text" and "jpg" not in s for s in iter_dataset(str(tmp_path / "out")))


def test_several_inputs_in_one_run_are_accounted_per_input(wds_dir, synth_dir, tmp_path):
    stats = curate([wds_dir[0], synth_dir], str(tmp_path / "out"), small_cfg())
    _invariant(stats)
    assert [i["formats"] for i in stats["by_input"]] == [["wds"], ["imagefolder", "text"]]
    assert sum(i["read"] for i in stats["by_input"]) == stats["read"]
    assert sum(i["kept"] for i in stats["by_input"]) == stats["kept"]
    assert read_manifest(str(tmp_path / "out"))["num_samples"] == stats["kept"]


def test_missing_input_is_a_run_level_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="nope.*does not exist"):
        curate([str(tmp_path / "nope")], str(tmp_path / "out"), small_cfg())


def test_folder_without_sources_and_non_tar_are_named(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.md").write_text("hello")
    with pytest.raises(UserError, match="no readable source"):
        discover([str(tmp_path / "x")])
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "a.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(UserError, match="a.tar: not a readable tar"):
        curate([str(tmp_path / "y")], str(tmp_path / "out"), small_cfg())


def test_unknown_format_and_config_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="--format 'csv'"):
        discover([str(tmp_path)], fmt="csv")
    with pytest.raises(ConfigError, match="unknown config key data.min_sid"):
        from_dict(DataConfig, {"min_sid": 3}, "data")
    with pytest.raises(ConfigError, match="data.phash_hamming: expected int"):
        from_dict(DataConfig, {"phash_hamming": "4"}, "data")


def test_format_flag_selects_one_layout_and_files_can_be_inputs(synth_dir, wds_dir):
    info = json.loads(open(f"{synth_dir}/synth.json", encoding="utf-8").read())
    only_images = discover([synth_dir], fmt="imagefolder")
    only_texts = discover([synth_dir], fmt="text")
    assert {p.fmt for p in only_images} == {"imagefolder"} and {p.fmt for p in only_texts} == {"text"}
    assert sum(p.stop - p.start for p in only_images) == info["items"]
    assert sum(p.stop - p.start for p in only_texts) == info["text_docs"]
    one_tar = discover([wds_dir[0] + "/a.tar"])
    assert [(p.fmt, p.uri.rsplit("/", 1)[-1]) for p in one_tar] == [("wds", "a.tar")]


@pytest.mark.parametrize("content", [b"a\nb\nc\nd\ne\n", b"a\nb\nc\nd\ne", b"", b"a\n", b"x\n\ny\nzz\r\n"])
def test_line_partitions_cover_every_line_once(tmp_path, content):
    from m6.data.sources import _line_parts, _lines

    p = tmp_path / "f.txt"
    p.write_bytes(content)
    for every in (1, 2, 3, 10):
        got = []
        for start, stop, offset in _line_parts(str(p), every):
            with _lines(str(p), start, stop, offset) as lines:
                got += [(n, line) for n, line in lines]
        assert got == list(enumerate(content.splitlines()))


def test_keys_stay_unique_across_same_stem_files_and_non_contiguous_tar_members(tmp_path):
    import tarfile

    from datakit import add

    d = tmp_path / "mix"
    d.mkdir()
    (d / "x.txt").write_text("a short note about a red cup on a table\n")
    (d / "x.jsonl").write_text(json.dumps({"text": "another note about a blue lamp on a desk"}) + "\n")
    with tarfile.open(d / "t.tar", "w") as t:
        add(t, "a.jpg", jpeg(shape=1))
        add(t, "a.txt", b"first sample called a")
        add(t, "b.jpg", jpeg(shape=2))
        add(t, "b.txt", b"a sample called b")
        add(t, "a.jpg", jpeg(shape=3, color=(10, 200, 10)))
        add(t, "a.txt", b"a second sample that reuses the key a")
    stats = curate([str(d)], str(tmp_path / "out"), small_cfg())
    keys = [s["__key__"] for s in iter_dataset(str(tmp_path / "out"))]
    assert stats["kept"] == 5 and len(set(keys)) == 5
