"""m6.storage against local paths and a real S3 API over HTTP."""

from __future__ import annotations

import socket
import threading

import pytest

from m6 import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env") + "/prefix"


def test_roundtrip_list_exists_delete(root):
    a, b = storage.join(root, "a.txt"), storage.join(root, "sub", "b.json")
    assert not storage.exists(a)
    storage.write_text(a, "héllo 世界")
    storage.write_json(b, {"x": 1})
    assert storage.read_text(a) == "héllo 世界"
    assert storage.read_json(b) == {"x": 1}
    assert storage.list_uris(root) == sorted([a, b])
    assert storage.size(a) == len("héllo 世界".encode())
    with storage.open_read(a) as f:
        assert f.read(2) == b"h\xc3"
    storage.delete(a)
    assert not storage.exists(a)
    storage.delete_tree(root)
    assert storage.list_uris(root) == []


def test_missing_object_is_file_not_found(root):
    with pytest.raises(FileNotFoundError, match="no such"):
        storage.read_bytes(storage.join(root, "nope"))


def test_open_write_appears_only_on_clean_exit(root):
    uri = storage.join(root, "w.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not storage.exists(uri)
    with storage.open_write(uri) as f:
        f.write(b"done")
    assert storage.read_bytes(uri) == b"done"


def test_multipart_upload_of_large_file(root, tmp_path):
    big = tmp_path / "big.bin"
    payload = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB → 3 parts of 5 MiB
    big.write_bytes(payload)
    uri = storage.join(root, "big.bin")
    storage.upload_file(big, uri, part_size=5 * 1024 * 1024)
    assert storage.size(uri) == len(payload)
    out = storage.download_file(uri, tmp_path / "back.bin")
    assert out.read_bytes() == payload


def test_publish_marks_complete(root):
    d = storage.join(root, "ckpt")
    storage.write_bytes(storage.join(d, "w.bin"), b"1")
    assert not storage.is_complete(d)
    storage.publish(d, content={"step": 3})
    assert storage.is_complete(d)
    assert storage.read_json(storage.join(d, "COMPLETE"))["step"] == 3


class FlakyProxy:
    """A TCP proxy in front of the S3 server that resets the first ``fail`` connections after some bytes."""

    def __init__(self, upstream: str, fail: int, after_bytes: int = 2000) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.up = (host, int(port))
        self.fail, self.after = fail, after_bytes
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.resets = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(self.up)
            cut = self.fail > 0
            if cut:
                self.fail -= 1
            threading.Thread(target=self._pipe, args=(c, u, cut), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, src, dst, cut: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if cut and sent + len(data) > self.after:
                    self.resets += 1
                    src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    src.close()
                    dst.close()
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def test_upload_survives_connection_reset_mid_upload(s3_env, s3_server, monkeypatch, tmp_path):
    storage.write_bytes(s3_env + "/warm", b"x")  # bucket exists before the proxy cuts anything
    proxy = FlakyProxy(s3_server, fail=2)
    monkeypatch.setenv("M6_S3_ENDPOINT", f"http://127.0.0.1:{proxy.port}")
    payload = b"z" * 300_000
    storage.write_bytes(s3_env + "/obj.bin", payload)
    assert proxy.resets >= 1
    assert storage.read_bytes(s3_env + "/obj.bin") == payload


def test_persistent_failure_names_the_uri(s3_env, monkeypatch):
    monkeypatch.setenv("M6_S3_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("M6_S3_RETRIES", "2")
    with pytest.raises(storage.StorageError, match="s3://.*/x"):
        storage.read_bytes(s3_env + "/x")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
