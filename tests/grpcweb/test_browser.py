"""A real browser: headless Chromium loads a page from a server of the test's own (another
origin than the proxy's), whose script calls the proxy with the grpc-web npm package, unary
in text and binary mode, server streaming, and an error; the test reads the results from the
page's DOM. Chromium speaks HTTP/1.1 to a cleartext port, with a CORS preflight per call."""

from __future__ import annotations

import functools
import html
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from backends import EchoBackendsFactory
from proxy_process import start_proxy
from tools import REPO_ROOT, missing_tool, require_tool

PAGE = Path(__file__).parent / "page" / "index.html"
GRPC_WEB = REPO_ROOT / ".tools" / "npm" / "node_modules" / "grpc-web" / "index.esm.js"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def guess_type(self, path: str | Path) -> str:
        return "text/javascript" if str(path).endswith(".js") else super().guess_type(path)


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[int]:
    """Serves the page and grpc-web.js from a directory of the test's; yields its port."""
    if not GRPC_WEB.exists():
        missing_tool("grpc-web", " (npm, in .tools/npm)")
    root = tmp_path / "site"
    root.mkdir()
    shutil.copy(PAGE, root / "index.html")
    shutil.copy(GRPC_WEB, root / "grpc-web.js")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_grpc_web_client_in_chromium(
    page_server: int, echo_backends: EchoBackendsFactory, tmp_path: Path
) -> None:
    chromium = require_tool("chromium")
    backends = echo_backends(2)
    origin = f"http://127.0.0.1:{page_server}"
    args = ["serve", "--cors-allowed-origins", origin, "--cors-expose-headers", "x-backend"]
    for name in ("x-echo-meta-page", "x-echo-interval-ms", "x-echo-status", "x-echo-message"):
        args += ["--cors-allow-headers", name]
    for backend in backends:
        args += ["--backend", backend.address]
    with start_proxy(args) as (_, port):
        url = f"{origin}/index.html?proxy=http://127.0.0.1:{port}"
        result = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stdout[-2000:]
    text = html.unescape(found.group(1))
    assert not text.startswith(("pending", "FAILED")), text
    out = json.loads(text)
    assert out["text"]["message"] == "hello text"
    assert out["binary"]["message"] == "hello binary"
    assert {out["text"]["backend"], out["binary"]["backend"]} <= {"b0", "b1"}
    stream = out["stream"]
    assert [m.split("@")[0] for m in stream["messages"]] == ["tick"] * 5, stream
    assert stream["backend"] in ("b0", "b1")  # response metadata, exposed through CORS
    assert out["error"] == {"code": 7, "message": "not for you"}
