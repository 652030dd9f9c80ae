"""The Kubernetes probes and the image's HEALTHCHECK ask paths that a running proxy's admin
endpoint answers with 200."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from backends import EchoBackendsFactory
from dockerfile_model import REPO_ROOT
from proxy_process import free_port, start_proxy

from proxy.ops.healthcheck import default_url

yaml = pytest.importorskip("yaml", reason="needs PyYAML (the dev extra: pip install -e '.[dev]')")


def probe_paths() -> set[str]:
    paths = set()
    for path in (REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                        if kind in container:
                            paths.add(container[kind]["httpGet"]["path"])
    return paths


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            code: int = response.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def test_probed_paths_answer_200(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    admin = free_port()
    healthcheck_url = default_url(f"0.0.0.0:{admin}")
    assert healthcheck_url is not None
    urls = {f"http://127.0.0.1:{admin}{path}" for path in probe_paths()} | {healthcheck_url}
    assert len(urls) >= 2
    with start_proxy(["serve", "--backend", backend.address, "--admin", f"127.0.0.1:{admin}"]):
        deadline = time.monotonic() + 15
        codes = {url: 0 for url in urls}
        # Readiness may trail the listening port by a moment; liveness may not.
        while time.monotonic() < deadline and set(codes.values()) != {200}:
            codes = {url: status(url) for url in urls}
            time.sleep(0.1)
        assert set(codes.values()) == {200}, codes
