"""proxy.ops.healthcheck, the image's HEALTHCHECK, against real HTTP servers and closed ports."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from dockerfile_model import REPO_ROOT

from proxy.ops import healthcheck


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = {"/healthz": (200, b"ok\n"), "/draining": (503, b"draining\nmore\n")}.get(
            self.path, (404, b"")
        )
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[int]:
    """A stand-in admin endpoint on 127.0.0.1: /healthz 200, /draining 503."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("admin", "url"),
    [
        (None, "http://127.0.0.1:9901/healthz"),
        ("", "http://127.0.0.1:9901/healthz"),
        ("0.0.0.0:9901", "http://127.0.0.1:9901/healthz"),
        (":8080", "http://127.0.0.1:8080/healthz"),
        ("[::]:9901", "http://[::1]:9901/healthz"),
        ("[::1]:9000", "http://[::1]:9000/healthz"),
        ("10.1.2.3:9901", "http://10.1.2.3:9901/healthz"),
        ("off", None),
        ("OFF", None),
    ],
)
def test_default_url_follows_the_admin_setting(admin: str | None, url: str | None) -> None:
    assert healthcheck.default_url(admin) == url


def test_200_is_healthy(admin: int) -> None:
    healthy, reason = healthcheck.check(f"http://127.0.0.1:{admin}/healthz")
    assert healthy, reason
    assert reason.endswith("HTTP 200 ok")


def test_503_is_unhealthy_with_the_first_line_of_the_reason(admin: int) -> None:
    healthy, reason = healthcheck.check(f"http://127.0.0.1:{admin}/draining")
    assert not healthy
    assert reason.endswith("HTTP 503 draining")


def test_a_closed_port_is_unhealthy() -> None:
    healthy, reason = healthcheck.check(f"http://127.0.0.1:{closed_port()}/healthz")
    assert not healthy
    assert "refused" in reason.lower()


def test_a_server_that_never_answers_times_out() -> None:
    # Listening but never accepting: the kernel completes the handshake, nobody answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/healthz"
        healthy, reason = healthcheck.check(url, timeout_s=0.2)
    assert not healthy
    assert "timed out" in reason


def test_a_proxy_variable_does_not_carry_the_check(
    admin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    healthy, reason = healthcheck.check(f"http://127.0.0.1:{admin}/healthz")
    assert healthy, reason


def run_module(*args: str, admin_env: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_ETCD_PROXY_")}
    if admin_env is not None:
        env[healthcheck.ADMIN_ENV] = admin_env
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "proxy.ops.healthcheck", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_module_finds_the_admin_port_from_the_environment(admin: int) -> None:
    result = run_module(admin_env=f"0.0.0.0:{admin}")
    assert result.returncode == 0, result
    assert result.stdout.startswith("healthy: ")


def test_the_module_exits_1_when_unhealthy(admin: int) -> None:
    result = run_module(f"http://127.0.0.1:{admin}/draining", admin_env=None)
    assert result.returncode == 1, result
    assert result.stdout.startswith("unhealthy: ")


@pytest.mark.parametrize(
    ("args", "admin_env"),
    [((), "off"), (("--verbose",), None), (("http://a/", "http://b/"), None)],
)
def test_never_exits_2_which_docker_reserves(args: tuple[str, ...], admin_env: str | None) -> None:
    result = run_module(*args, admin_env=admin_env)
    assert result.returncode == 1, result
    assert result.stderr.strip(), "says why"
