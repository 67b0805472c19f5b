"""Shared fixtures: a real S3 API over HTTP (moto's server process), paths to the shared real data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process on a loopback port; yields its endpoint URL."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/", proc)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point m6.storage at the test S3 server with throwaway credentials; yields a fresh bucket URI."""
    monkeypatch.setenv("M6_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("M6_S3_ACCESS_KEY", "testing")
    monkeypatch.setenv("M6_S3_SECRET_KEY", "testing")
    monkeypatch.setenv("M6_S3_REGION", "us-east-1")
    monkeypatch.setenv("M6_S3_RETRIES", "4")
    bucket = f"t{time.monotonic_ns() % 10**12}"
    yield f"s3://{bucket}"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("shared data folder not present beside the checkout")
    return SHARED_DATA
