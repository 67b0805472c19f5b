"""Fixtures for curation tests: a small dirty synthetic corpus and WebDataset tars with dirt."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from datakit import add, jpeg, png, webp

from m6.data.synth import synthesize


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    """A dirty synthetic corpus: 160 items + 60 documents, a quarter of them dirty."""
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synthesize(str(out), n=160, seed=3, n_text=60, dirt_rate=0.25)
    return str(out)


@pytest.fixture
def wds_dir(tmp_path) -> tuple[str, dict]:
    """Two WebDataset tars (one truncated) with dirty members; returns the folder and the expected drops."""
    d = tmp_path / "wds"
    d.mkdir()
    with tarfile.open(d / "a.tar", "w") as t:
        for i in range(6):
            add(t, f"s{i:03d}.jpg", jpeg(shape=i, color=(40 * i % 255, 90, 200)))
            add(t, f"s{i:03d}.txt", f"a blue product number {i} with a red box".encode())
        add(t, "webp1.webp", webp())
        add(t, "webp1.txt", "一盏北欧风格的台灯".encode())
        add(t, "png1.png", png())
        add(t, "png1.json", json.dumps({"caption": "a green square on clear background", "url": "http://x"}).encode())
        add(t, "bad1.jpg", b"GIF87a? no, just garbage bytes")
        add(t, "bad1.txt", b"broken image here")
        add(t, "enc1.jpg", jpeg(shape=9))
        add(t, "enc1.txt", "红色的杯子".encode("gbk"))
        add(t, "noimg.txt", b"a caption without an image")
        add(t, "dup1.jpg", jpeg(shape=0, color=(0, 90, 200)))
        add(t, "dup1.txt", b"the same image as s000 again")
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as t:
        for i in range(5):
            add(t, f"b{i:03d}.jpg", jpeg(shape=20 + i, color=(10, 10 + 40 * i, 10)))
            add(t, f"b{i:03d}.txt", f"item {i} in the second shard, green".encode())
    raw = full.getvalue()
    # Cut inside the 4th sample's jpg: 3 whole samples survive, the 4th is counted as tar_truncated.
    cut = raw.index(b"b003.jpg") + 700
    (d / "b.tar").write_bytes(raw[:cut])
    expected = {"image_not_image": 1, "caption_not_utf8": 1, "image_missing": 1, "dup_image_exact": 1,
                "tar_truncated": 1}
    return str(d), expected
