"""The per-partition curation step run in worker processes: read, clean, filter, resize, hash, write candidates."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import time
from collections import Counter

from m6 import storage
from m6.config import DataConfig
from m6.data.dedup import minhash_values
from m6.data.filters import check_caption, process_image, text_hash
from m6.data.shards import TarSink, verify_shard
from m6.data.sources import MISSING, Item, Partition, read_partition

EXAMPLES_PER_REASON = 3
"""Dropped examples kept per reason per partition for the report's thumbnail grid."""
KEPT_EXAMPLES = 4


def fingerprint(part: Partition, cfg: DataConfig) -> str:
    """Identity of a partition's output: the partition spec plus every config field that changes it."""
    c = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workers",)}
    spec = dataclasses.asdict(part)
    return hashlib.sha1(json.dumps([spec, c], sort_keys=True, default=str).encode()).hexdigest()


def part_uris(work_uri: str, index: int) -> tuple[str, str]:
    """The candidate tar and the stats JSON of partition ``index`` under the work folder."""
    return storage.join(work_uri, f"part-{index:05d}.tar"), storage.join(work_uri, f"part-{index:05d}.json")


def completed_part(part: Partition, cfg: DataConfig, work_uri: str) -> dict | None:
    """The stats of an already written and verified partition output, or None (then it is redone)."""
    tar_uri, json_uri = part_uris(work_uri, part.index)
    try:
        st = storage.read_json(json_uri)
    except (FileNotFoundError, storage.StorageError):
        return None
    if st.get("fingerprint") != fingerprint(part, cfg):
        return None
    return st if verify_shard(tar_uri, st["output"]) else None


def thumbnail(data: bytes | None, px: int = 64) -> str | None:
    """A small base64 JPEG of an image for the report, or None when it does not decode."""
    if not data:
        return None
    try:
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (px, px))
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:
        return None


def _first_text(item: Item) -> str:
    for c in item.captions or []:
        if isinstance(c, str):
            return c[:120]
    return ""


class PartStats:
    """Counters of one partition; merged by the driver."""

    def __init__(self) -> None:
        self.read = 0
        self.dropped: Counter = Counter()
        self.modified: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}

    def drop(self, reason: str, item: Item) -> None:
        """Count a lost sample under ``reason`` and keep the first few as report examples."""
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            img = item.image if isinstance(item.image, bytes) else None
            ex.append({"key": item.key, "text": _first_text(item), "thumb": thumbnail(img)})


def curate_item(item: Item, part: Partition, cfg: DataConfig, st: PartStats) -> dict | None:
    """One raw item → a candidate sample (with private dedup hashes), or None after counting its drop reason."""
    if item.reason is not None:
        st.drop(item.reason, item)
        return None
    if item.captions is None or not item.captions:
        st.drop("caption_missing", item)
        return None
    kept: list[str] = []
    lang = item.lang if item.lang in ("en", "zh") else None
    first_reason = None
    is_text = item.is_text
    for raw in item.captions:
        kw = {"min_chars": cfg.min_text_chars, "max_chars": cfg.max_text_chars} if is_text else {}
        text, lang_c, reason, changes = check_caption(raw, lang, cfg, **kw)
        if text is None:
            first_reason = first_reason or reason
        elif text not in kept:
            kept.append(text)
            st.modified.update(changes)  # cleaned and kept (what the report's "cleaned" line counts)
            lang = lang or lang_c
    if not kept:
        st.drop(first_reason or "caption_empty", item)
        return None
    meta = {"source": part.uri, "format": part.fmt, "kind": "text" if is_text else "image", "lang": lang or "en",
            **{k: v for k, v in item.meta.items() if k not in ("image",)}}
    if len(kept) > 1 or not is_text:
        meta["captions"] = kept
    sample: dict = {"__key__": item.key, "txt": kept[0]}
    if is_text:
        meta["_dedup"] = {"text": text_hash(kept[0]),
                          "minhash": minhash_values(kept[0], cfg.minhash_perm) if cfg.near_dup_texts else None}
    else:
        if item.image is MISSING:
            st.drop("image_missing", item)
            return None
        img, reason = process_image(item.image, cfg)
        if img is None:
            st.drop(reason, item)
            return None
        sample[img.ext] = img.data
        meta.update({"orig_size": list(img.orig_size), "size": list(img.size), "phash": f"{img.phash:064x}"})
        meta["_dedup"] = {"pixel": img.pixel_hash, "phash": img.phash, "color": img.color_sig.hex()}
    sample["json"] = meta
    return sample


def process_partition(part: Partition, cfg: DataConfig, work_uri: str) -> dict:
    """Curate one partition into ``part-NNNNN.tar`` (candidates) and ``part-NNNNN.json`` (its stats, written last)."""
    t0 = time.perf_counter()
    tar_uri, json_uri = part_uris(work_uri, part.index)
    st = PartStats()
    sink = TarSink(tar_uri)
    kept_examples: list[dict] = []
    try:
        for item in read_partition(part):
            st.read += 1
            sample = curate_item(item, part, cfg, st)
            if sample is not None:
                sink.add(sample)
                if len(kept_examples) < KEPT_EXAMPLES and "txt" in sample and sample["json"]["kind"] == "image":
                    img = sample.get("jpg", sample.get("png"))
                    kept_examples.append({"key": sample["__key__"], "text": sample["txt"][:120], "thumb": thumbnail(img)})
    except BaseException:
        sink.abort()
        raise
    entry = sink.close()
    out = {"partition": dataclasses.asdict(part), "fingerprint": fingerprint(part, cfg), "output": entry,
           "read": st.read, "candidates": entry["samples"], "dropped": dict(st.dropped),
           "modified": dict(st.modified), "examples": st.examples, "kept_examples": kept_examples,
           "duration_s": time.perf_counter() - t0}
    if st.read != entry["samples"] + sum(st.dropped.values()):
        raise RuntimeError(f"partition {part.index} ({part.uri}): accounting broke: read {st.read} != "
                           f"{entry['samples']} + {sum(st.dropped.values())}")
    storage.write_json(json_uri, out)
    return out
