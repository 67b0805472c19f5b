"""Input sources: format detection, partitioning, and streaming readers for every supported layout."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from m6 import storage
from m6.data.shards import IMAGE_EXTS, TarTruncated, iter_tar_members, split_member_name
from m6.errors import UserError

FORMATS = ("imagefolder", "wds", "parquet", "muge", "text")
LINES_PER_PARTITION = 500
TEXT_LINES_PER_PARTITION = 4000
_COCOCN = re.compile(r"^(\S+#\S+)\s+(.*)$")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]+")
MISSING = object()
"""Stands for an image a record names but that does not exist (counted as image_missing)."""


@dataclass
class Partition:
    """One unit of work for a curation worker: a file (or a line range of one) of one input."""

    index: int
    input_index: int
    fmt: str
    uri: str
    root: str = ""
    start: int = 0
    stop: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """Key prefix: input number + file name, so keys from different inputs and files never collide."""
        name = _KEY_BAD.sub("_", storage.basename(self.uri))
        if len(name) > 24:  # keep keys short; the hash keeps long names apart
            name = name[:16] + hashlib.sha1(name.encode()).hexdigest()[:8]
        return f"{self.input_index:02d}{name}"


@dataclass
class Item:
    """One raw sample as read from a source, before filtering."""

    key: str
    image: bytes | None | object = None
    """Image bytes; None for a text-only sample; ``MISSING`` when the named file is absent."""
    captions: list | None = None
    """Raw caption strings; None when the record had none."""
    lang: str | None = None
    meta: dict = field(default_factory=dict)
    reason: str | None = None
    """Set when the record is already lost at read time (malformed, not UTF-8, truncated tar)."""

    @property
    def is_text(self) -> bool:
        return self.image is None


def make_key(tag: str, ident: str) -> str:
    """A WebDataset-safe key (no dots or slashes), short, stable across runs."""
    k = _KEY_BAD.sub("_", str(ident)).strip("_") or "x"
    if len(k) > 60:
        k = k[:40] + "_" + hashlib.sha1(k.encode()).hexdigest()[:12]
    return f"{tag}-{k}"


# --------------------------------------------------------------------------- discovery


def _suffix(uri: str) -> str:
    name = storage.basename(uri).lower()
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _line_parts(uri: str, every: int) -> list[tuple[int, int, int]]:
    """``(first line, end line, byte offset of the first line)`` for every ``every`` lines, in one streamed pass.

    Workers seek to their byte offset instead of reading the file from the top, so P
    partitions of a big captions file cost one read of it, not P.
    """
    parts: list[tuple[int, int, int]] = []
    n, pos, start_pos = 0, 0, 0
    with storage.open_read(uri) as f:
        for line in io.BufferedReader(f) if isinstance(f, io.RawIOBase) else f:
            if n % every == 0:
                start_pos = pos
            pos += len(line)
            n += 1
            if n % every == 0:
                parts.append((n - every, n, start_pos))
    if n % every or not parts:
        parts.append((n - n % every, n, start_pos if n % every else pos))
    return parts


def _is_muge_texts(uri: str) -> bool:
    """A jsonl whose first record maps a text to image ids (MUGE's ``query_text`` + ``item_ids``)."""
    with storage.open_read(uri) as f:
        head = io.BufferedReader(f).readline() if isinstance(f, io.RawIOBase) else f.readline()
    try:
        rec = json.loads(head)
    except ValueError:
        return False
    return isinstance(rec, dict) and ("item_ids" in rec or "image_ids" in rec)


def discover(inputs: list[str], fmt: str | None = None) -> list[Partition]:
    """Partitions of every input; an input is a folder or file whose format is detected or forced.

    Raises:
        UserError: an input is missing, unreadable, or holds nothing curation can read.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: unknown; choose one of {', '.join(FORMATS)}")
    specs: list[tuple[int, str, str, str, dict]] = []  # (input, fmt, uri, root, extra)
    for i, inp in enumerate(inputs):
        try:
            is_file = storage.exists(inp) and not storage.is_dir(inp)
            files = [inp] if is_file else [u for u in storage.list_uris(inp, recursive=False) if not u.endswith("/")]
        except Exception as e:  # StorageError, and S3 refusals (AccessDenied, InvalidAccessKeyId) from minio
            raise UserError(f"input {inp}: cannot be read: {type(e).__name__}: {e}") from None
        if not files:
            raise UserError(f"input {inp}: does not exist or is empty")
        found = _classify(i, inp, files, fmt, is_file)
        if not found:
            raise UserError(f"input {inp}: no readable source found (expected captions.jsonl, *.tar, *.parquet, "
                            f"*.tsv, *.txt or *.jsonl; or pass --format)")
        specs.extend(found)
    parts: list[Partition] = []
    for inp_i, f, uri, root, extra in specs:
        try:
            # The size goes into the partition's identity: a rerun redoes a partition whose file changed.
            extra = {**extra, "bytes": storage.size(uri)}
            if f in ("imagefolder", "muge", "text"):
                every = TEXT_LINES_PER_PARTITION if f == "text" else LINES_PER_PARTITION
                ranges = _line_parts(uri, every)
            else:
                ranges = [(0, None, 0)]
        except OSError as e:  # permission denied, a folder where a file was expected, a dead endpoint
            raise UserError(f"input {inputs[inp_i]}: cannot read {uri}: {e}") from None
        for s, e, offset in ranges:
            parts.append(Partition(len(parts), inp_i, f, uri, root, s, e, {**extra, "offset": offset}))
    return parts


def _classify(i: int, inp: str, files: list[str], fmt: str | None, is_file: bool) -> list:
    names = {storage.basename(u): u for u in files}
    # Relative image paths resolve against the input folder, or the folder holding an input file.
    root = (inp.rstrip("/").rsplit("/", 1)[0] if "/" in inp.rstrip("/") else ".") if is_file else inp.rstrip("/")
    out = []
    if fmt == "imagefolder" or (fmt is None and "captions.jsonl" in names):
        cap = names.get("captions.jsonl") or (inp if is_file else None)
        if cap is None:
            raise UserError(f"input {inp}: --format imagefolder needs a captions.jsonl")
        out.append((i, "imagefolder", cap, root, {}))
        if fmt == "imagefolder":
            return out
    used = {"captions.jsonl"}
    tsvs = [u for u in files if _suffix(u) == "tsv"]
    if tsvs and fmt in (None, "muge"):
        texts = [u for u in files if _suffix(u) == "jsonl" and storage.basename(u) not in used and _is_muge_texts(u)]
        if not texts:
            raise UserError(f"input {inp}: MUGE TSV {storage.basename(tsvs[0])} needs a jsonl of texts "
                            f"(lines with item_ids) beside it")
        used.update(storage.basename(t) for t in texts)
        out.extend((i, "muge", t, root, {"texts": texts}) for t in tsvs)
    for u in files:
        sfx, name = _suffix(u), storage.basename(u)
        if name in used or name.startswith("."):
            continue
        if sfx == "tar" and fmt in (None, "wds"):
            out.append((i, "wds", u, root, {}))
        elif sfx == "parquet" and fmt in (None, "parquet"):
            out.append((i, "parquet", u, root, {}))
        elif sfx in ("txt", "jsonl") and fmt in (None, "text"):
            out.append((i, "text", u, root, {}))
    return out


# --------------------------------------------------------------------------- readers


@contextlib.contextmanager
def _lines(uri: str, start: int, stop: int | None, offset: int = 0) -> Iterator[Iterator[tuple[int, bytes]]]:
    """``(line number, line without EOL)`` for lines ``start`` up to ``stop``; line ``start`` begins at byte ``offset``."""
    with storage.open_read(uri) as f:
        if offset and f.seekable():
            f.seek(offset)
        elif offset:  # an S3 stream: skip the bytes before this partition without splitting them into lines
            left = offset
            while left > 0:
                got = f.read(min(left, 1 << 20))
                if not got:
                    break
                left -= len(got)
        buf = io.BufferedReader(f) if isinstance(f, io.RawIOBase) else f

        def gen() -> Iterator[tuple[int, bytes]]:
            for n, line in enumerate(buf, start=start):
                if stop is not None and n >= stop:
                    return
                yield n, line.rstrip(b"\r\n")

        yield gen()


def read_partition(p: Partition) -> Iterator[Item]:
    """The raw items of one partition, streamed."""
    reader = {"imagefolder": _read_imagefolder, "wds": _read_wds, "parquet": _read_parquet,
              "muge": _read_muge, "text": _read_text}[p.fmt]
    yield from reader(p)


def _decode_line(line: bytes) -> tuple[dict | None, str | None]:
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    try:
        rec = json.loads(s)
    except json.JSONDecodeError:
        return None, "record_malformed"
    return (rec, None) if isinstance(rec, dict) else (None, "record_malformed")


def _captions_of(rec: dict) -> list | None:
    caps = rec.get("captions", rec.get("caption", rec.get("text")))
    if caps is None:
        return None
    if isinstance(caps, str):
        return [caps]
    if isinstance(caps, list):
        return [c for c in caps if isinstance(c, str)]
    return None


def _read_image(root: str, rel: str) -> bytes | object:
    """The image a captions.jsonl line names, relative to its folder or to its ``images/`` subfolder."""
    for cand in (storage.join(root, rel), storage.join(root, "images", rel)):
        try:
            return storage.read_bytes(cand)
        except FileNotFoundError:
            continue
    return MISSING


def _read_imagefolder(p: Partition) -> Iterator[Item]:
    with _lines(p.uri, p.start, p.stop, p.extra.get("offset", 0)) as lines:
        for n, line in lines:
            if not line.strip():
                continue
            key = make_key(p.tag, f"{n:07d}")
            rec, reason = _decode_line(line)
            if rec is None or not isinstance(rec.get("image"), str):
                yield Item(key, reason=reason or "record_malformed", meta={"line": n})
                continue
            data = _read_image(p.root, rec["image"])
            meta = {k: v for k, v in rec.items() if k not in ("captions", "caption", "text", "lang")}
            yield Item(key, data, _captions_of(rec), rec.get("lang"), meta)


def _read_wds(p: Partition) -> Iterator[Item]:
    group: dict = {}
    gkey = None
    seen: dict[str, int] = {}  # WebDataset keys must be contiguous; a key seen again gets a suffix, not a clash

    def flush() -> Item | None:
        if gkey is None:
            return None
        n = seen.get(gkey, 0)
        seen[gkey] = n + 1
        key = make_key(p.tag, gkey if n == 0 else f"{gkey}-r{n}")
        img = next((group[e] for e in IMAGE_EXTS if e in group), None)
        meta: dict = {"source_key": gkey}
        caps = None
        lang = None
        if "json" in group:
            rec, reason = _decode_line(group["json"])
            if rec is not None:
                caps = _captions_of(rec)
                lang = rec.get("lang")
                meta.update({k: v for k, v in rec.items() if k in ("url", "width", "height", "heldout", "attributes")})
        if "txt" in group:
            try:
                caps = [group["txt"].decode("utf-8")] + [c for c in (caps or []) if c != group["txt"].decode("utf-8")]
            except UnicodeDecodeError:
                return Item(key, img if img is not None else MISSING, reason="caption_not_utf8", meta=meta)
        return Item(key, img if img is not None else MISSING, caps, lang, meta)

    got_any = False
    try:
        with storage.open_read(p.uri) as f:
            for name, data in iter_tar_members(f):
                got_any = True
                k, ext = split_member_name(name)
                if k != gkey:
                    item = flush()
                    if item is not None:
                        yield item
                    group, gkey = {}, k
                group[ext] = data
    except TarTruncated as e:
        cut_key = split_member_name(e.member)[0] if e.member else None
        if cut_key is not None and cut_key == gkey:  # the sample being read lost a member: count it, once
            yield Item(make_key(p.tag, gkey), reason="tar_truncated", meta={"source_key": gkey})
            return
        item = flush()
        if item is not None:
            yield item
        if cut_key is not None:
            yield Item(make_key(p.tag, cut_key), reason="tar_truncated", meta={"source_key": cut_key})
        return
    except (tarfile.TarError, OSError) as e:
        if not got_any:
            raise UserError(f"input {p.uri}: not a readable tar ({e})") from None
        raise
    item = flush()
    if item is not None:
        yield item


def _parquet_columns(schema) -> tuple[str | None, str | None, str | None]:
    import pyarrow as pa

    img = cap = key = None
    for name in ("jpg", "image", "png", "webp", "img", "image_bytes", "bytes"):
        if name in schema.names:
            t = schema.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t):
                img = name
                break
    cap = next((c for c in ("caption", "txt", "text", "title") if c in schema.names), None)
    key = next((c for c in ("key", "id", "image_id") if c in schema.names), None)
    return img, cap, key


def _read_parquet(p: Partition) -> Iterator[Item]:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="m6-pq-") as tmp:
        path = storage.local_path(p.uri) if not storage.is_s3(p.uri) else storage.download_file(p.uri, Path(tmp) / "x.parquet")
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise UserError(f"input {p.uri}: not a readable Parquet file ({e})") from None
        img_col, cap_col, key_col = _parquet_columns(pf.schema_arrow)
        if img_col is None or cap_col is None:
            raise UserError(f"input {p.uri}: Parquet needs an image bytes column (jpg/image/png…) and a caption column "
                            f"(caption/txt/text); found {pf.schema_arrow.names}")
        cols = [c for c in (img_col, cap_col, key_col) if c]
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            d = batch.to_pydict()
            for j in range(batch.num_rows):
                img = d[img_col][j]
                if isinstance(img, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                    img = img.get("bytes")
                ident = d[key_col][j] if key_col else row
                cap = d[cap_col][j]
                yield Item(make_key(p.tag, f"{ident}"), img if img is not None else MISSING,
                           None if cap is None else [cap], None, {"row": row})
                row += 1


def _load_muge_texts(uris: list[str]) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for u in uris:
        with _lines(u, 0, None) as lines:
            for _, line in lines:
                rec, _ = _decode_line(line)
                if not rec:
                    continue
                t = rec.get("query_text") or rec.get("text") or rec.get("caption")
                for iid in rec.get("item_ids") or rec.get("image_ids") or []:
                    if isinstance(t, str):
                        texts.setdefault(str(iid), []).append(t)
    return texts


def _read_muge(p: Partition) -> Iterator[Item]:
    texts = _load_muge_texts(p.extra["texts"])
    with _lines(p.uri, p.start, p.stop, p.extra.get("offset", 0)) as lines:
        for n, line in lines:
            if not line.strip():
                continue
            ident, tab, b64 = line.partition(b"\t")
            key = make_key(p.tag, ident.decode("ascii", "replace") if tab else f"line{n}")
            if not tab:
                yield Item(key, reason="record_malformed", meta={"line": n})
                continue
            iid = ident.decode("ascii", "replace").strip()
            try:
                img = base64.b64decode(b64.strip(), validate=True)
            except (binascii.Error, ValueError):  # the image column does not decode to bytes at all
                yield Item(key, reason="image_corrupt", captions=texts.get(iid), meta={"muge_id": iid})
                continue
            yield Item(key, img, texts.get(iid), None, {"muge_id": iid})


def _read_text(p: Partition) -> Iterator[Item]:
    is_jsonl = _suffix(p.uri) == "jsonl"
    with _lines(p.uri, p.start, p.stop, p.extra.get("offset", 0)) as lines:
        for n, line in lines:
            if not line.strip():
                continue  # blank lines separate nothing and are not documents
            key = make_key(p.tag, f"{n:07d}")
            if is_jsonl:
                rec, reason = _decode_line(line)
                if rec is None:
                    yield Item(key, reason=reason, meta={"line": n})
                    continue
                t = rec.get("text")
                meta = {k: v for k, v in rec.items() if k in ("id", "heldout", "url")}
                yield Item(key, None, None if not isinstance(t, str) else [t], rec.get("lang"), meta)
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError:
                yield Item(key, reason="caption_not_utf8", meta={"line": n})
                continue
            m = _COCOCN.match(s)  # COCO-CN style: IMAGEID#N<TAB>caption
            if m:
                yield Item(make_key(p.tag, m.group(1)), None, [m.group(2)], None, {"source_id": m.group(1)})
            else:
                yield Item(key, None, [s], None, {})
