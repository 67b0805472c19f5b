"""The held-out evaluation set: read from curated shards, checked against the manifest's split, batched for the model."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from m6.config import BOS_ID, EOS_ID, PAD_ID
from m6.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Distinct images and texts of one split, with the text × image relevance the retrieval metrics need."""

    split: str
    images: list[bytes] = field(default_factory=list)
    """Encoded image bytes, one per distinct image (identical bytes are one image)."""
    image_keys: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    """Per image, every caption it has (several under the COCO protocol)."""
    texts: list[str] = field(default_factory=list)
    """Distinct captions (retrieval queries); one may describe several images (MUGE)."""
    docs: list[str] = field(default_factory=list)
    """Text-only documents (language-modelling perplexity on text)."""
    samples: int = 0
    """Samples of the split that were read (image-text pairs + text-only)."""
    dropped: dict[str, int] = field(default_factory=dict)
    overlap: dict = field(default_factory=dict)

    def relevance(self) -> np.ndarray:
        """``[len(texts), len(images)]`` bool: text t is a reference caption of image i."""
        index = {t: j for j, t in enumerate(self.texts)}
        rel = np.zeros((len(self.texts), len(self.images)), dtype=bool)
        for i, refs in enumerate(self.references):
            for r in refs:
                rel[index[r], i] = True
        return rel

    def add_pair(self, key: str, image: bytes, captions: list[str], _by_hash: dict) -> None:
        """Add an image with its captions; identical image bytes merge into one image with all their captions."""
        h = hashlib.sha1(image).hexdigest()
        if h not in _by_hash:
            _by_hash[h] = len(self.images)
            self.images.append(image)
            self.image_keys.append(key)
            self.references.append([])
        refs = self.references[_by_hash[h]]
        for c in captions:
            if c not in refs:
                refs.append(c)

    def finish(self) -> None:
        """Fix the distinct caption list (the text queries) once every image is in."""
        seen: dict[str, None] = {}
        for refs in self.references:
            for r in refs:
                seen.setdefault(r, None)
        self.texts = list(seen)


def _drop(es: EvalSet, reason: str) -> None:
    es.dropped[reason] = es.dropped.get(reason, 0) + 1


def _captions(sample: dict) -> list[str]:
    meta = sample.get("json") or {}
    caps = [sample["txt"]] if isinstance(sample.get("txt"), str) else []
    extra = meta.get("captions") if isinstance(meta.get("captions"), list) else []
    return [c.strip() for c in [*caps, *extra] if isinstance(c, str) and c.strip()]


def _decodes(image: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.convert("RGB")  # a full decode: verify() alone passes some truncated files
        return True
    except Exception:  # PIL raises many types for broken files
        return False


def load_split(data_uri: str, split: str, max_samples: int | None = None, *, model_data_uri: str | None = None) -> tuple[EvalSet, dict]:
    """Read one split of a curated dataset and prove it does not overlap the training split.

    Every sample's split is recomputed from the manifest's split block (its fractions
    and the curated per-sample ``split``, via :func:`m6.data.shards.sample_split`); a
    sample is admitted only when that split is the requested one *and* its key hash
    (:func:`m6.data.shards.split_of`) does not put it in training, so neither way of
    reading the training split can overlap the evaluation. ``split="all"`` evaluates the
    whole dataset and is refused when the model was trained on that same dataset.

    Returns:
        ``(EvalSet, manifest)``.
    """
    from m6.data.shards import iter_shard, read_manifest, sample_split, shard_uris, split_of

    manifest = read_manifest(data_uri)
    sp = manifest.get("split") or {}
    if "val_fraction" not in sp or "test_fraction" not in sp:
        raise UserError(f"{data_uri}/manifest.json: no split block with val_fraction/test_fraction; "
                        "cannot prove the evaluation split is held out")
    if split == "all" and model_data_uri and model_data_uri.rstrip("/") == data_uri.rstrip("/"):
        raise UserError(f"--split all: the model was trained on {data_uri}; evaluate its test or val split")
    es = EvalSet(split=split)
    by_hash: dict[str, int] = {}
    seen_by_split = {"train": 0, "val": 0, "test": 0}
    excluded = admitted_train = 0
    for uri in shard_uris(data_uri, manifest):
        for s in iter_shard(uri):
            which = sample_split(s, sp["val_fraction"], sp["test_fraction"])
            seen_by_split[which] = seen_by_split.get(which, 0) + 1
            if split != "all" and which != split:
                continue
            key_split = split_of(s["__key__"], sp["val_fraction"], sp["test_fraction"])
            if split != "all" and key_split == "train":
                # Curated as held out (e.g. ``heldout: true``) while its key hashes into the training
                # split, which a key-hash reader trains on: never evaluate it.
                excluded += 1
                continue
            if max_samples is not None and es.samples >= max_samples:
                break
            es.samples += 1
            admitted_train += int(which == "train" or key_split == "train")  # non-zero only under split "all"
            image = next((s[e] for e in ("jpg", "jpeg", "png", "webp") if isinstance(s.get(e), bytes)), None)
            caps = _captions(s)
            if image is None:  # text-only document (``"kind": "text"``)
                if caps:
                    es.docs.extend(caps)
                else:
                    _drop(es, "text sample without text")
                continue
            if not caps:
                _drop(es, "image without caption")
                continue
            if not _decodes(image):
                _drop(es, "undecodable image")
                continue
            es.add_pair(s["__key__"], image, caps, by_hash)
        if max_samples is not None and es.samples >= max_samples:
            break
    es.finish()
    es.overlap = {"method": sp.get("method"), "val_fraction": sp["val_fraction"], "test_fraction": sp["test_fraction"],
                  "train_samples_admitted": admitted_train, "samples_seen_by_split": seen_by_split,
                  "excluded_key_hash_train": excluded}
    if es.samples == 0:
        raise UserError(f"{data_uri}: the {split!r} split is empty (manifest counts: {sp.get('counts')})")
    log.info("eval set %s: %d samples, %d images, %d texts, %d documents, dropped %s", split, es.samples,
             len(es.images), len(es.texts), len(es.docs), es.dropped or "none")
    return es, manifest


def load_raw_folder(uri: str) -> tuple[EvalSet, str]:
    """An uncurated ``captions.jsonl`` + images folder (the MUGE / Chinese-CLIP layout) as one eval set.

    Each line is ``{"image": name, "captions": [...]}``; the image is looked up beside
    the file, then under ``images/``. Images with no caption stay in the gallery as
    distractors, as in MUGE's retrieval protocol, where most gallery images match no
    query. Returns the set (split ``"all"``) and the SHA-256 of ``captions.jsonl``.
    """
    from m6 import storage

    raw = storage.read_bytes(storage.join(uri, "captions.jsonl"))
    es = EvalSet(split="all")
    by_hash: dict[str, int] = {}
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        es.samples += 1
        try:
            rec = json.loads(line)
            name = rec["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            _drop(es, "malformed captions.jsonl line")
            log.warning("%s/captions.jsonl line %d: not a JSON record with an 'image' key; skipped", uri, n)
            continue
        caps = [c.strip() for c in rec.get("captions") or [] if isinstance(c, str) and c.strip()]
        image = None
        for cand in (storage.join(uri, name), storage.join(uri, "images", name)):
            if storage.exists(cand):
                image = storage.read_bytes(cand)
                break
        if image is None:
            _drop(es, "image file missing")
            continue
        if not _decodes(image):
            _drop(es, "undecodable image")
            continue
        es.add_pair(str(name).rsplit(".", 1)[0], image, caps, by_hash)
    es.finish()
    es.overlap = {"method": "uncurated folder without splits: the whole set is evaluated", "train_samples_admitted": None}
    if not es.images:
        raise UserError(f"{uri}/captions.jsonl: no readable image (dropped: {es.dropped})")
    return es, hashlib.sha256(raw).hexdigest()


def image_tensor(images: list[bytes], size: int):
    """Decode, center-crop to a square, resize to ``size`` and scale to [-1, 1]: ``[B, 3, size, size]`` float32."""
    import torch
    from PIL import Image

    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, data in enumerate(images):
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            out[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(out)


def text_tensor(texts: list[str], tokenizer, max_len: int):
    """``<s> ids </s>`` then ``<pad>``, truncated to ``max_len``: ``[B, T]`` int64."""
    import torch

    rows = []
    for t in texts:
        ids = tokenizer.encode(t).ids[: max_len - 2]
        rows.append([BOS_ID, *ids, EOS_ID])
    width = max((len(r) for r in rows), default=2)
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def decode_ids(tokenizer, ids: list[int]) -> str:
    """Generated ids (specials already removed) → text."""
    return tokenizer.decode([i for i in ids if i > 4], skip_special_tokens=True).strip()


def thumbnail_b64(image: bytes, px: int = 96) -> str:
    """A small PNG of the image as base64, for embedding in the HTML report."""
    import base64

    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
