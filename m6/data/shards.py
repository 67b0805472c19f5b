"""WebDataset shards (schema ``m6.shards/v1``): writer, streaming reader, manifest and key-hash split."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m6 import storage
from m6.errors import UserError

SCHEMA = "m6.shards/v1"
SPLIT_METHOD = ("sha1(key) as uniform [0,1): < test_fraction → test, < test+val → val, else train; "
                "held-out samples' keys carry a -hN suffix chosen so that they hash into test")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a sample key: ``"train"``, ``"val"`` or ``"test"``.

    The first 8 bytes of SHA-1(key) read as a uniform number in [0, 1); the same key
    lands in the same split on every machine and in every run.
    """
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def heldout_key(key: str, val_fraction: float, test_fraction: float) -> str:
    """``key`` with the smallest suffix ``-hN`` that :func:`split_of` puts in ``test``.

    Samples of held-out attribute combinations are renamed this way during curation, so
    every reader that splits by key hash alone agrees that they are test data.
    """
    if test_fraction <= 0:
        return key
    n = 0
    while split_of(f"{key}-h{n}", val_fraction, test_fraction) != "test":
        n += 1
    return f"{key}-h{n}"


def sample_split(sample: dict, val_fraction: float, test_fraction: float) -> str:
    """The split a curated sample belongs to: its json ``split`` when present, else :func:`split_of`.

    Curation writes ``split`` into every sample's json; samples of held-out attribute
    combinations (``"heldout": true``) are always ``test`` so evaluation can measure generalisation.
    """
    meta = sample.get("json") or {}
    if meta.get("split") in ("train", "val", "test"):
        return meta["split"]
    if meta.get("heldout"):
        return "test"
    return split_of(sample["__key__"], val_fraction, test_fraction)


def shard_name(index: int) -> str:
    """``shard-000042.tar`` for index 42."""
    return f"shard-{index:06d}.tar"


# --------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    """A write-only stream that forwards to ``f`` and keeps a running SHA-256 and byte count."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        b = bytes(b)
        self._f.write(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return len(b)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: the same samples give the same sha256
    info.mode = 0o444
    info.uname = info.gname = "m6"
    tar.addfile(info, io.BytesIO(data))


def encode_sample(sample: dict) -> list[tuple[str, bytes]]:
    """Tar members for one sample: ``<key>.<ext>`` → bytes (str as UTF-8, dict as JSON)."""
    key = sample["__key__"]
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys on them)")
    out = []
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif isinstance(value, dict):
            data = json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
        else:
            data = bytes(value)
        out.append((f"{key}.{ext}", data))
    return out


class TarSink:
    """One tar being written to a local temp file; uploaded/moved to ``uri`` on :meth:`close`."""

    def __init__(self, uri: str, tmp_dir: str | None = None) -> None:
        self.uri = uri
        self._tmp = tempfile.NamedTemporaryFile(prefix="m6-shard-", suffix=".tar", dir=tmp_dir, delete=False)
        self._hw = _HashingWriter(self._tmp)
        self._tar = tarfile.open(fileobj=self._hw, mode="w|", format=tarfile.GNU_FORMAT)
        self.samples = 0
        self.reused = False

    @property
    def nbytes(self) -> int:
        return self._hw.nbytes

    def add(self, sample: dict) -> None:
        """Append one sample's members."""
        for name, data in encode_sample(sample):
            _add_member(self._tar, name, data)
        self.samples += 1

    def close(self, reuse: bool = False) -> dict:
        """Finish the tar, put it at ``uri`` and return its manifest entry (samples, bytes, sha256).

        With ``reuse``, an object already at ``uri`` with the same size and SHA-256 (a shard a
        crashed run completed) is verified and kept instead of being uploaded again.
        """
        self._tar.close()
        self._tmp.flush()
        self._tmp.close()
        entry = {"name": storage.basename(self.uri), "uri": self.uri, "samples": self.samples,
                 "bytes": self._hw.nbytes, "sha256": self._hw.sha.hexdigest()}
        try:
            if reuse and verify_shard(self.uri, entry):
                self.reused = True
            else:
                storage.upload_file(self._tmp.name, self.uri)
        finally:
            Path(self._tmp.name).unlink(missing_ok=True)
        return entry

    def abort(self) -> None:
        """Discard the tar being written (nothing reaches ``uri``)."""
        try:
            self._tar.close()
        finally:
            self._tmp.close()
            Path(self._tmp.name).unlink(missing_ok=True)


class ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of at most ``max_samples`` samples / ``max_bytes`` bytes."""

    def __init__(self, out_uri: str, max_samples: int, max_bytes: int, start_index: int = 0,
                 reuse: bool = False) -> None:
        self.out_uri = out_uri
        self.reuse = reuse
        self.reused = 0
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.index = start_index
        self.shards: list[dict] = []
        self._sink: TarSink | None = None

    def write(self, sample: dict) -> None:
        """Add a sample, starting a new shard when the current one is full."""
        if self._sink is not None and (self._sink.samples >= self.max_samples or self._sink.nbytes >= self.max_bytes):
            self.flush()
        if self._sink is None:
            self._sink = TarSink(storage.join(self.out_uri, shard_name(self.index)))
            self.index += 1
        self._sink.add(sample)

    def flush(self) -> None:
        """Close the current shard (if any) and record its manifest entry."""
        if self._sink is not None:
            self.shards.append(self._sink.close(reuse=self.reuse))
            self.reused += int(self._sink.reused)
            self._sink = None

    def close(self) -> list[dict]:
        """Close the last shard; returns every shard's manifest entry in order."""
        self.flush()
        return self.shards


def file_sha256(uri: str) -> tuple[str, int]:
    """SHA-256 hex digest and size in bytes of an object, streamed."""
    h = hashlib.sha256()
    n = 0
    with storage.open_read(uri) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


# --------------------------------------------------------------------------- reading


def _decode(ext: str, data: bytes) -> Any:
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    return data


class TarTruncated(Exception):
    """A tar ended early; ``member`` is the name whose data was cut (None when a header was)."""

    def __init__(self, member: str | None, detail: str) -> None:
        super().__init__(f"tar ends early{f' inside {member}' if member else ''}: {detail}")
        self.member = member


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def iter_tar_members(f: Any) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular files of a streamed tar, in order.

    Raises:
        TarTruncated: the stream ended in the middle of a member (what was yielded is whole).
        tarfile.ReadError: the stream is not a tar at all.
    """
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        it = iter(tar)
        while True:
            try:
                m = next(it)
            except StopIteration:
                return
            except _TAR_ERRORS as e:
                raise TarTruncated(None, str(e)) from e
            if not m.isfile():
                continue
            try:
                ef = tar.extractfile(m)
                data = ef.read() if ef is not None else b""
            except _TAR_ERRORS as e:
                raise TarTruncated(m.name, str(e)) from e
            if len(data) != m.size:
                raise TarTruncated(m.name, f"{len(data)} of {m.size} bytes")
            yield m.name, data


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` → (``dir/abc``, ``seg.jpg``): WebDataset keys end at the basename's first dot."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_shard(shard_uri: str) -> Iterator[dict]:
    """Stream the samples of one shard: ``{"__key__", "jpg"|"png" (bytes), "txt" (str), "json" (dict)}``."""
    cur: dict | None = None
    try:
        with storage.open_read(shard_uri) as f:
            for name, data in iter_tar_members(f):
                key, ext = split_member_name(name)
                if cur is not None and cur["__key__"] != key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = {"__key__": key}
                cur[ext] = _decode(ext, data)
    except (TarTruncated, tarfile.TarError) as e:
        raise UserError(f"{shard_uri}: damaged shard ({e}); re-run curation to rewrite it") from None
    if cur is not None:
        yield cur


def read_manifest(dataset_uri: str) -> dict:
    """The dataset's ``manifest.json``; a clear error when it is missing or of another schema."""
    uri = storage.join(dataset_uri, "manifest.json")
    try:
        m = storage.read_json(uri)
    except FileNotFoundError:
        raise UserError(f"{dataset_uri}: no manifest.json (not a curated dataset, or curation did not finish)") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise UserError(f"{uri}: schema {m.get('schema') if isinstance(m, dict) else None!r}, expected {SCHEMA!r}")
    return m


def shard_uris(dataset_uri: str, manifest: dict | None = None) -> list[str]:
    """URIs of the dataset's shards in manifest order (the dataset URI joined with each ``name``)."""
    manifest = manifest if manifest is not None else read_manifest(dataset_uri)
    return [storage.join(dataset_uri, s["name"]) for s in manifest["shards"]]


def iter_dataset(dataset_uri: str, split: str | None = None) -> Iterator[dict]:
    """All samples of a dataset in shard order, optionally only those of one split."""
    m = read_manifest(dataset_uri)
    val, test = m["split"]["val_fraction"], m["split"]["test_fraction"]
    for uri in shard_uris(dataset_uri, m):
        for s in iter_shard(uri):
            if split is None or sample_split(s, val, test) == split:
                yield s


def verify_shard(uri: str, entry: dict) -> bool:
    """True when the object exists with the size and SHA-256 the manifest entry records."""
    if not storage.exists(uri):
        return False
    sha, n = file_sha256(uri)
    return sha == entry.get("sha256") and n == entry.get("bytes")
