"""Helpers for curation tests: small configs, image builders, a faulty S3 proxy."""

from __future__ import annotations

import io
import socket
import tarfile
import threading

from m6.config import DataConfig


def small_cfg(**kw) -> DataConfig:
    """A fast config for tests: 32-px images, small shards, a small tokenizer."""
    base = dict(image_size=32, shard_max_samples=40, tokenizer_vocab_size=400, workers=1)
    base.update(kw)
    return DataConfig(**base)


def jpeg(color=(200, 30, 30), size=(64, 48), quality=90, shape: int = 0) -> bytes:
    """A small JPEG with a distinct drawing per ``shape`` so images are not near-duplicates of each other."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (240, 240, 240))
    d = ImageDraw.Draw(im)
    w, h = size
    x = (shape * 7) % max(1, w - 12)
    y = (shape * 11) % max(1, h - 12)
    d.rectangle((x, y, x + 8 + shape % 5 * 2, y + 8 + shape % 3 * 3), fill=color)
    d.ellipse((w - x - 14, h - y - 14, w - x - 2, h - y - 2), fill=tuple(255 - c for c in color))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(size=(40, 40)) -> bytes:
    from PIL import Image

    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste((30, 160, 60, 255), (5, 5, size[0] - 5, size[1] - 15))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def webp(size=(56, 40)) -> bytes:
    """A small WebP (img2dataset can write webp members)."""
    from PIL import Image

    im = Image.new("RGB", size, (20, 20, 120))
    im.paste((250, 220, 0), (10, 10, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class FaultyS3Proxy:
    """A TCP proxy to the S3 server that resets every connection once ``budget_bytes`` of requests went through.

    It behaves like a storage endpoint that dies mid-upload: the transfer in flight is cut
    and every later request is refused, until :meth:`heal` is called.
    """

    def __init__(self, upstream: str, budget_bytes: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.up = (host, int(port))
        self.budget = budget_bytes
        self.sent = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        self.budget = 1 << 62

    def _broken(self) -> bool:
        return self.sent >= self.budget

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self._broken():
                self._reset(c)
                continue
            u = socket.create_connection(self.up)
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _reset(self, s: socket.socket) -> None:
        self.cuts += 1
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        except OSError:
            pass

    def _pipe(self, src, dst, upstream_bound: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream_bound:
                    with self._lock:
                        self.sent += len(data)
                    if self._broken():
                        self._reset(src)
                        dst.close()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
