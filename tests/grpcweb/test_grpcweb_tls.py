"""gRPC-Web on a TLS listener: h2 or HTTP/1.1, as the client's ALPN chooses.

With gRPC-Web on, the TLS listener offers http/1.1 after h2 (tls.server_context): a browser
uses h2, an HTTP/1.1-only client (curl --http1.1, an old stack) gets the HTTP/1.1 front end
instead of being closed. With gRPC-Web off, h2 is all it offers (tests/tls: a client without
ALPN h2 is closed).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from backends import EchoBackendsFactory
from grpcweb_support import BINARY_CT, decode_body, echo_body, parse_head
from proxy_process import free_port, start_proxy, tls_listen_args
from tls_support import TestCA
from tools import require_tool


@pytest.mark.parametrize(("flag", "version"), [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")])
def test_grpc_web_over_tls_takes_the_protocol_alpn_chose(
    tls_ca: TestCA,
    echo_backends: EchoBackendsFactory,
    tmp_path: Path,
    flag: str,
    version: str,
) -> None:
    curl = require_tool("curl")
    certs = tls_ca.issue_server("proxy", dns=("localhost",), ips=("127.0.0.1",))
    (backend,) = echo_backends(1)
    port = free_port()
    request, head, out = tmp_path / "request.bin", tmp_path / "head.txt", tmp_path / "out.bin"
    request.write_bytes(echo_body("over tls"))
    with start_proxy(["serve", *tls_listen_args(certs, port), "--backend", backend.address]):
        argv = [
            curl, "-sS", "--max-time", "30", "--cacert", str(tls_ca.ca_pem), flag,
            "-X", "POST", "-H", f"content-type: {BINARY_CT}", "-D", str(head), "-o", str(out),
            "--data-binary", f"@{request}", f"https://localhost:{port}/echo.Echo/UnaryEcho",
        ]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=40)
    first_line = head.read_bytes().split(b"\r\n", 1)[0].decode()
    assert first_line.startswith(f"{version} 200"), first_line
    status, fields = parse_head(head.read_bytes().strip())
    assert status == 200 and fields["content-type"].startswith("application/grpc-web"), fields
    messages, trailers = decode_body(out.read_bytes(), text=False)
    assert [m.message for m in messages] == ["over tls"]
    assert trailers["grpc-status"] == "0"
