"""One URI API for local paths and ``s3://bucket/key`` (any S3 API, through the minio SDK).

Every function takes a URI: a local path (``runs/x``, ``/data``, ``file:///data``)
or ``s3://bucket/prefix``. The S3 endpoint and credentials come from the
environment: ``M6_S3_ENDPOINT`` (``http://host:port``), ``M6_S3_ACCESS_KEY``,
``M6_S3_SECRET_KEY``, ``M6_S3_REGION``, with ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` as fallbacks.

Transient S3 failures (connection resets, 5xx, throttling) are retried with
exponential backoff. A dataset or checkpoint is *published* by writing its
marker object last (:func:`publish`); readers check :func:`is_complete`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 16 * 1024 * 1024
"""Multipart chunk for S3 uploads, in bytes (S3 minimum is 5 MiB)."""
_TRANSIENT_S3_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                       "OperationAborted", "InternalServerError", "503", "500", "502", "504"}


class StorageError(OSError):
    """A storage operation failed for good; the message names the URI."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    p = urlparse(uri)
    if p.scheme != "s3" or not p.netloc:
        raise StorageError(f"not an s3:// URI: {uri!r}")
    return p.netloc, p.path.lstrip("/")


def _local(uri: str | Path) -> Path:
    s = str(uri)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s)


def join(uri: str | Path, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (never the OS separator for s3)."""
    out = str(uri)
    for p in parts:
        p = str(p)
        if not p:
            continue
        out = out.rstrip("/") + "/" + p.lstrip("/") if out else p
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- S3 client


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    access_key: str | None
    secret_key: str | None
    region: str | None

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ.get
        endpoint = env("M6_S3_ENDPOINT") or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
        return cls(
            endpoint=endpoint,
            access_key=env("M6_S3_ACCESS_KEY") or env("AWS_ACCESS_KEY_ID"),
            secret_key=env("M6_S3_SECRET_KEY") or env("AWS_SECRET_ACCESS_KEY"),
            region=env("M6_S3_REGION") or env("AWS_DEFAULT_REGION") or env("AWS_REGION"),
        )


_clients: dict[tuple[S3Settings, int], Any] = {}
"""Cached clients per (settings, process id): a forked child must not reuse its parent's pooled sockets."""


def s3_client():
    """A cached ``minio.Minio`` client for the environment's endpoint and credentials."""
    settings = S3Settings.from_env()
    client = _clients.get((settings, os.getpid()))
    if client is None:
        import minio
        import urllib3

        u = urlparse(settings.endpoint if "://" in settings.endpoint else "http://" + settings.endpoint)
        # Our own retry loop handles transient errors; urllib3 gets a short timeout and no retries of its own.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=120), retries=False, maxsize=16)
        client = minio.Minio(u.netloc, access_key=settings.access_key, secret_key=settings.secret_key,
                             secure=u.scheme == "https", region=settings.region, http_client=http)
        _clients[(settings, os.getpid())] = client
    return client


def _is_transient(e: BaseException) -> bool:
    import urllib3.exceptions as ue
    from minio.error import S3Error, ServerError

    if isinstance(e, (ue.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, ServerError):
        return True
    if isinstance(e, S3Error):
        return e.code in _TRANSIENT_S3_CODES
    return False


def retrying(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay_s: float = 0.2) -> T:
    """Call ``fn`` and retry transient S3 errors with exponential backoff and jitter."""
    attempts = attempts or int(os.environ.get("M6_S3_RETRIES", "5"))
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _is_transient(e) or i == attempts - 1:
                if _is_transient(e):
                    raise StorageError(f"{what}: failed after {attempts} attempts: {e}") from e
                raise
            delay = base_delay_s * (2**i) * (0.5 + random.random())
            log.warning("%s: transient error (%s), retry %d/%d in %.2fs", what, type(e).__name__, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _not_found(e: BaseException) -> bool:
    from minio.error import S3Error

    return isinstance(e, S3Error) and e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound")


def ensure_bucket(bucket: str) -> None:
    c = s3_client()
    if not retrying(lambda: c.bucket_exists(bucket), f"s3://{bucket}"):
        retrying(lambda: c.make_bucket(bucket), f"s3://{bucket}")


# --------------------------------------------------------------------------- reading


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def get() -> bytes:
            r = s3_client().get_object(bucket, key)
            try:
                return r.read()
            finally:
                r.close()
                r.release_conn()

        try:
            return retrying(get, uri)
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(f"{uri}: no such object") from None
            raise
    p = _local(uri)
    if not p.exists():
        raise FileNotFoundError(f"{uri}: no such file")
    return p.read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri}: not valid JSON: {e}") from None


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A binary stream over the object (S3 objects stream; nothing is read whole)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            r = retrying(lambda: s3_client().get_object(bucket, key), uri)
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(f"{uri}: no such object") from None
            raise
        try:
            yield _ResponseReader(r)
        finally:
            r.close()
            r.release_conn()
    else:
        p = _local(uri)
        if not p.exists():
            raise FileNotFoundError(f"{uri}: no such file")
        with open(p, "rb") as f:
            yield f


class _ResponseReader(io.RawIOBase):
    """A file-like view over a urllib3 response (what tarfile and PIL expect)."""

    def __init__(self, resp: Any) -> None:
        self._r = resp

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._r.read(len(b))
        n = len(data)
        b[:n] = data
        return n


def download_file(uri: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            retrying(lambda: s3_client().fget_object(bucket, key, str(path)), uri)
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(f"{uri}: no such object") from None
            raise
    else:
        shutil.copyfile(_local(uri), path)
    return path


# --------------------------------------------------------------------------- writing


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object; local writes are atomic (temp file + rename)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        ensure_bucket(bucket)
        retrying(lambda: s3_client().put_object(bucket, key, io.BytesIO(data), len(data)), uri)
        return
    p = _local(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def upload_file(path: str | Path, uri: str, part_size: int = PART_SIZE) -> None:
    """Copy a local file to ``uri``; large files go up as S3 multipart uploads of ``part_size`` parts."""
    path = Path(path)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        ensure_bucket(bucket)
        retrying(lambda: s3_client().fput_object(bucket, key, str(path), part_size=part_size), uri)
        return
    dst = _local(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if path.resolve() == dst.resolve():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dst)


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[IO[bytes]]:
    """A binary file to write; the object appears at ``uri`` only when the block exits cleanly."""
    if is_s3(uri):
        with tempfile.NamedTemporaryFile(prefix="m6-upload-", suffix=".part") as tmp:
            yield tmp
            tmp.flush()
            upload_file(tmp.name, uri)
        return
    p = _local(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp_path, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def upload_dir(path: str | Path, uri: str) -> list[str]:
    """Copy a local folder's files below ``uri`` (relative layout kept); returns the URIs written."""
    out = []
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        dst = join(uri, f.relative_to(root).as_posix())
        upload_file(f, dst)
        out.append(dst)
    return out


# --------------------------------------------------------------------------- listing and deleting


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            retrying(lambda: s3_client().stat_object(bucket, key), uri)
            return True
        except Exception as e:
            if _not_found(e):
                return False
            raise
    return _local(uri).exists()


def size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return retrying(lambda: s3_client().stat_object(bucket, key), uri).size
    return _local(uri).stat().st_size


def list_uris(uri: str, recursive: bool = True) -> list[str]:
    """Object/file URIs below a folder or prefix, sorted. Missing → empty list."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""

        def go() -> list[str]:
            try:
                objs = s3_client().list_objects(bucket, prefix=prefix, recursive=recursive)
                return sorted(f"s3://{bucket}/{o.object_name}" for o in objs)
            except Exception as e:
                if _not_found(e):
                    return []
                raise

        return retrying(go, uri)
    p = _local(uri)
    if not p.exists():
        return []
    if p.is_file():
        return [str(p)]
    it = p.rglob("*") if recursive else p.iterdir()
    return sorted(str(f) for f in it if f.is_file() and not f.name.endswith(".tmp"))


def is_dir(uri: str) -> bool:
    """A local folder, or an S3 prefix with at least one object below it."""
    if is_s3(uri):
        return bool(list_uris(uri, recursive=False)) or bool(list_uris(uri))
    return _local(uri).is_dir()


def delete(uri: str) -> None:
    """Delete one object/file; missing is not an error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(lambda: s3_client().remove_object(bucket, key), uri)
        return
    with contextlib.suppress(FileNotFoundError):
        _local(uri).unlink()


def delete_tree(uri: str) -> None:
    """Delete everything below a folder/prefix."""
    if is_s3(uri):
        for u in list_uris(uri):
            delete(u)
        return
    shutil.rmtree(_local(uri), ignore_errors=True)


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI (error for s3://)."""
    if is_s3(uri):
        raise StorageError(f"{uri}: not a local path")
    return _local(uri)


# --------------------------------------------------------------------------- atomic publish


def publish(uri: str, marker: str = "COMPLETE", content: dict[str, Any] | None = None) -> str:
    """Mark the folder ``uri`` complete by writing its marker last; returns the marker's URI."""
    m = join(uri, marker)
    write_json(m, {"published_unix_s": time.time(), **(content or {})})
    return m


def is_complete(uri: str, marker: str = "COMPLETE") -> bool:
    return exists(join(uri, marker))
