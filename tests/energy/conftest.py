"""Real Prometheus and Pushgateway servers (Debian packages, installed when missing) on loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from servers import wait_http  # beside the suite's root conftest

from .fakes import free_port

PACKAGES = ("prometheus", "prometheus-pushgateway")


def _ensure_installed() -> None:
    """Install Debian's prometheus and prometheus-pushgateway when their binaries are missing (CI runs as root)."""
    if all(shutil.which(b) for b in PACKAGES):
        return
    if os.geteuid() != 0:
        pytest.fail(f"{' and '.join(PACKAGES)} are not installed and installing them needs root: "
                    f"apt-get install -y {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    # The packages start system services; the tests run their own instances on free ports.
    for svc in PACKAGES:
        subprocess.run(["service", svc, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class PrometheusServer:
    """One prometheus process scraping the given targets every 500 ms."""

    def __init__(self, folder: Path, targets: list[str], pushgateway: str | None = None):
        _ensure_installed()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        cfg = folder / "prometheus.yml"
        jobs = [{"job_name": "m6", "static_configs": [{"targets": targets}]}]
        if pushgateway:
            # honor_labels keeps the pushing job's own job/instance labels.
            jobs.append({"job_name": "pushgateway", "honor_labels": True,
                         "static_configs": [{"targets": [pushgateway.split("://", 1)[-1]]}]})
        cfg.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"},
            "scrape_configs": jobs,
        }))
        self.log = open(folder / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/-/ready", self.proc)

    def query(self, promql: str) -> list[dict]:
        """Instant query over the HTTP API; returns the result vector."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_scraping(self, n_targets: int, timeout_s: float = 30.0, job: str = "m6") -> None:
        """Block until ``job``'s targets have been scraped once (Prometheus applies new targets on a 5-s tick)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            up = self.query(f'up{{job="{job}"}}')
            if len(up) >= n_targets and all(r["value"][1] == "1" for r in up):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Prometheus at {self.url} did not scrape its {n_targets} target(s) in {timeout_s}s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    """A factory: ``prometheus(["127.0.0.1:PORT"], pushgateway=URL)`` starts a server scraping those."""
    servers: list[PrometheusServer] = []

    def start(targets: list[str], pushgateway: str | None = None) -> PrometheusServer:
        servers.append(PrometheusServer(tmp_path / f"prometheus{len(servers)}", targets, pushgateway))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def pushgateway(tmp_path):
    """A prometheus-pushgateway process on a free loopback port; yields its URL."""
    _ensure_installed()
    port = free_port()
    log = open(tmp_path / "pushgateway.log", "wb")
    proc = subprocess.Popen([shutil.which("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
