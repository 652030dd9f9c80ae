"""TLS end to end: a real proxy process, grpcio TLS clients and backends, real sockets.

    grpcio client --TLS / mTLS / h2c / unix-->  python -m proxy serve  --TLS / h2c-->  echo

Each test starts its own proxy with certificates made by its own CA (tests/tls_support.py).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import (
    EchoBackendsFactory,
    EchoServer,
    TLSEchoBackendsFactory,
    echo_stub,
    open_channel,
    open_tls_channel,
)
from cryptography import x509
from proxy_process import (
    free_port,
    log_events,
    proxy_output,
    run_cli,
    short_socket_path,
    start_proxy,
    tls_listen_args,
    wait_for,
)
from tls_support import CertFiles, TestCA

from proxy_examples.echo import echo_pb2

CALL_TIMEOUT_S = 10.0
SPIFFE_WEB = "spiffe://example.org/ns/shop/sa/web"
SPIFFE_CHECKOUT = "spiffe://example.org/ns/shop/sa/checkout"


def _call(
    channel: grpc.Channel, message: str = "hi"
) -> tuple[echo_pb2.EchoResponse, dict[str, str]]:
    response, call = echo_stub(channel).UnaryEcho.with_call(
        echo_pb2.EchoRequest(message=message), timeout=CALL_TIMEOUT_S
    )
    return response, dict(call.initial_metadata())


def _failure(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        echo_stub(channel).UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=CALL_TIMEOUT_S)
    return caught.value


def _server_serial(port: int, ca: Path) -> int:
    """The serial of the certificate a new TLS connection to the proxy gets."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _wait_event(
    proc: subprocess.Popen[bytes], event: str, count: int = 1, **fields: object
) -> list[dict[str, Any]]:
    """Wait until the proxy logged `count` lines of `event` with these fields; return them."""

    def matching() -> list[dict[str, Any]]:
        return [e for e in log_events(proc, event) if all(e.get(k) == v for k, v in fields.items())]

    wait_for(lambda: len(matching()) >= count, f"{count} {event} log line(s) with {fields}")
    return matching()


def _local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@pytest.fixture
def server_certs(tls_ca: TestCA) -> CertFiles:
    return tls_ca.issue_server("proxy", dns=("localhost",), ips=("127.0.0.1",))


@pytest.fixture
def plain_backend(echo_backends: EchoBackendsFactory) -> EchoServer:
    [backend] = echo_backends(1)
    return backend


def _tls_args(certs: CertFiles, port: int, *extra: str) -> list[str]:
    return ["serve", *tls_listen_args(certs, port), *extra]


# ---------------------------------------------------------------------------- listener


def test_tls_listener_serves_grpcio_and_h2c_listener_beside_it(
    tls_ca: TestCA, plain_backend: EchoServer
) -> None:
    # A leaf from an intermediate CA: the certificate file must carry the chain.
    intermediate = tls_ca.intermediate()
    certs = intermediate.issue_server("proxy", chain=True)
    tls_port, h2c_port = free_port(), free_port()
    args = _tls_args(certs, tls_port, "--listen", f"h2c:127.0.0.1:{h2c_port}")
    with start_proxy([*args, "--backend", plain_backend.address]) as (proc, _):
        with open_tls_channel(f"localhost:{tls_port}", tls_ca.root_pem) as channel:
            response, _ = _call(channel, "over tls")
            assert response.message == "over tls"
        with open_channel(f"127.0.0.1:{h2c_port}") as channel:
            assert _call(channel, "over h2c")[0].message == "over h2c"
        listening = log_events(proc, "listening")
        assert {(tuple(e["addresses"]), e["tls"]) for e in listening} == {
            ((f"127.0.0.1:{tls_port}",), True),
            ((f"127.0.0.1:{h2c_port}",), False),
        }


def test_mutual_tls_accepts_a_good_client_and_logs_its_identity(
    tls_ca: TestCA, other_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    port = free_port()
    args = _tls_args(server_certs, port, "--tls-client-ca", str(tls_ca.ca_pem))
    good = tls_ca.issue_client("web", uris=(SPIFFE_WEB,))
    untrusted = other_ca.issue_client("web", uris=(SPIFFE_WEB,))
    expired = tls_ca.issue_client("old", uris=(SPIFFE_WEB,), expired=True)
    with start_proxy([*args, "--backend", plain_backend.address]) as (proc, _):
        with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem, client=good) as channel:
            assert _call(channel)[0].message == "hi"
        [access] = _wait_event(proc, "call")
        assert access["client"] == SPIFFE_WEB
        assert access["grpc_status"] == 0

        with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem) as channel:
            assert _failure(channel).code() is grpc.StatusCode.UNAVAILABLE
        _wait_event(proc, "tls_handshake_failed", kind="no_client_certificate")
        for client in (untrusted, expired):
            with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem, client=client) as channel:
                assert _failure(channel).code() is grpc.StatusCode.UNAVAILABLE
        failed = _wait_event(proc, "tls_handshake_failed", 2, kind="bad_client_certificate")
        assert any("expired" in str(e["reason"]) for e in failed), failed
        # The refused clients disturbed nobody: a good client still gets through.
        with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem, client=good) as channel:
            assert _call(channel)[0].message == "hi"


def test_route_allow_lets_only_the_listed_identity_call(
    tls_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    port, h2c_port = free_port(), free_port()
    args = _tls_args(
        server_certs,
        port,
        "--tls-client-ca",
        str(tls_ca.ca_pem),
        "--route-allow",
        f"echo.Echo={SPIFFE_CHECKOUT}",
        "--listen",
        f"h2c:127.0.0.1:{h2c_port}",
    )
    checkout = tls_ca.issue_client("checkout", uris=(SPIFFE_CHECKOUT,))
    web = tls_ca.issue_client("web", uris=(SPIFFE_WEB,))
    with start_proxy([*args, "--backend", plain_backend.address]):
        with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem, client=checkout) as channel:
            assert _call(channel)[0].message == "hi"
        with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem, client=web) as channel:
            error = _failure(channel)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == f"client '{SPIFFE_WEB}' may not call echo.Echo"
        with open_channel(f"127.0.0.1:{h2c_port}") as channel:
            error = _failure(channel)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "without a verified certificate" in (error.details() or "")


def test_a_client_without_alpn_h2_is_closed_at_once(
    tls_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    # With gRPC-Web on, http/1.1 is offered too (tests/grpcweb/test_grpcweb_tls.py).
    port = free_port()
    args = [*_tls_args(server_certs, port), "--no-grpc-web", "--backend", plain_backend.address]
    with start_proxy(args) as (
        proc,
        _,
    ):
        context = ssl.create_default_context(cafile=str(tls_ca.ca_pem))
        context.set_alpn_protocols(["http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert tls.recv(100) == b""  # close_notify, not a hang (timeout=5 would raise)
        _wait_event(proc, "tls_handshake_failed", kind="no_h2")


def test_cleartext_on_the_tls_port_and_tls_on_the_h2c_port_close_only_that_connection(
    tls_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    port, h2c_port, admin = free_port(), free_port(), free_port()
    args = _tls_args(
        server_certs, port, "--listen", f"h2c:127.0.0.1:{h2c_port}", "--admin", f"127.0.0.1:{admin}"
    )
    with (
        start_proxy([*args, "--backend", plain_backend.address]) as (proc, _),
        open_tls_channel(f"localhost:{port}", tls_ca.ca_pem) as tls_channel,
        open_channel(f"127.0.0.1:{h2c_port}") as h2c_channel,
    ):
        _call(tls_channel)
        _call(h2c_channel)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert raw.recv(100) == b""
        _wait_event(proc, "tls_handshake_failed", kind="not_tls")
        context = ssl.create_default_context(cafile=str(tls_ca.ca_pem))
        with (
            socket.create_connection(("127.0.0.1", h2c_port), timeout=5) as raw,
            pytest.raises(ssl.SSLError),
        ):
            context.wrap_socket(raw, server_hostname="localhost")
        _wait_event(proc, "client_protocol_error", reason="TLS handshake on a cleartext h2c port")
        # Both connections made before go on working.
        _call(tls_channel)
        _call(h2c_channel)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as page:
            metrics = page.read().decode()
        assert 'grpc_proxy_tls_handshake_failures_total{kind="not_tls"} 1.0' in metrics
        assert 'grpc_proxy_limits_tripped_total{limit="TLS_ON_CLEARTEXT_PORT"} 1.0' in metrics


def test_handshake_timeout_and_pending_handshake_cap(
    tls_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    port = free_port()
    args = _tls_args(
        server_certs,
        port,
        "--tls-handshake-timeout",
        "1",
        "--tls-max-pending-handshakes",
        "2",
        "--backend",
        plain_backend.address,
    )
    with start_proxy(args) as (proc, _):
        # start_proxy's readiness probe was a handshake too: let it end first.
        _wait_event(proc, "tls_handshake_failed", kind="closed")
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)  # client pacing: the proxy accepts both before the third comes
            with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
                assert third.recv(100) == b""  # closed on accept
                [refused] = _wait_event(proc, "tls_handshake_failed", kind="pending_limit")
                assert refused["peer"] == _local(third)
            for sock in silent:  # closed by the handshake timeout, not by us
                assert sock.recv(100) == b""
            timed_out = _wait_event(proc, "tls_handshake_failed", 2, kind="timeout")
            assert {e["peer"] for e in timed_out} == {_local(s) for s in silent}
        finally:
            for sock in silent:
                sock.close()
        # Slots free again: a real client gets through.
        with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem) as channel:
            assert _call(channel)[0].message == "hi"


# ---------------------------------------------------------------------------- backends


def _backend_tls_args(backend: EchoServer, ca: Path) -> list[str]:
    """`serve` with TLS to this one backend, verified against `ca`."""
    return ["serve", "--backend", backend.address, "--backend-tls", "--backend-ca", str(ca)]


def test_tls_backends_verified_with_the_ca(
    tls_ca: TestCA, other_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    backend_certs = tls_ca.issue_server("backend")
    [backend] = tls_echo_backends(1, backend_certs)
    with (
        start_proxy(_backend_tls_args(backend, tls_ca.ca_pem)) as (_, port),
        open_channel(f"127.0.0.1:{port}") as channel,
    ):
        assert _call(channel)[0].backend == backend.name
    # The wrong CA: a clean UNAVAILABLE naming the backend and the TLS reason.
    with start_proxy(_backend_tls_args(backend, other_ca.ca_pem)) as (proc, port):
        with open_channel(f"127.0.0.1:{port}") as channel:
            error = _failure(channel)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        details = error.details() or ""
        assert f"{backend.address}: TLS handshake failed: certificate verify failed" in details
        [failed] = _wait_event(proc, "backend_connect_failed")
        assert "certificate verify failed" in str(failed["reason"])


def test_backend_that_requires_client_certificates(
    tls_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    backend_certs = tls_ca.issue_server("backend")
    [backend] = tls_echo_backends(1, backend_certs, tls_ca.ca_pem)
    proxy_client = tls_ca.issue_client("proxy", uris=("spiffe://example.org/proxy",))
    args = _backend_tls_args(backend, tls_ca.ca_pem)
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        error = _failure(channel)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert backend.address in (error.details() or "")
    mtls = [*args, "--backend-cert", str(proxy_client.cert), "--backend-key", str(proxy_client.key)]
    with start_proxy(mtls) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        _response, metadata = _call(channel)
        assert metadata["x-peer-uri"] == "spiffe://example.org/proxy"


def test_backend_server_name_override_and_per_target_table(
    tls_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory, tmp_path: Path
) -> None:
    # A certificate that names only backend.internal: 127.0.0.1 does not match it.
    backend_certs = tls_ca.issue_server("backend", dns=("backend.internal",), ips=())
    [backend] = tls_echo_backends(1, backend_certs)
    args = _backend_tls_args(backend, tls_ca.ca_pem)
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        assert "certificate verify failed" in (_failure(channel).details() or "")
    with (
        start_proxy([*args, "--backend-server-name", "backend.internal"]) as (_, port),
        open_channel(f"127.0.0.1:{port}") as channel,
    ):
        assert _call(channel)[0].backend == backend.name
    # The same from a [targets.NAME] table (the --backend list is the target "static").
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[targets.static]\nbackend_tls = true\nbackend_ca = "{tls_ca.ca_pem}"\n'
        'backend_server_name = "backend.internal"\n'
    )
    with (
        start_proxy(["serve", "--config", str(config), "--backend", backend.address]) as (_, port),
        open_channel(f"127.0.0.1:{port}") as channel,
    ):
        assert _call(channel)[0].backend == backend.name


# ---------------------------------------------------------------------------- reload


def test_sighup_rereads_the_certificate_and_open_streams_go_on(
    tls_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    port = free_port()
    args = [*_tls_args(server_certs, port), "--backend", plain_backend.address]
    with (
        start_proxy(args) as (proc, _),
        open_tls_channel(f"localhost:{port}", tls_ca.ca_pem) as channel,
    ):
        first = _server_serial(port, tls_ca.ca_pem)
        assert first == server_certs.serial
        outbox: queue.Queue[echo_pb2.EchoRequest | None] = queue.Queue()

        def source() -> Iterator[echo_pb2.EchoRequest]:
            while (item := outbox.get()) is not None:
                yield item

        stream = echo_stub(channel).BidirectionalStreamingEcho(source(), timeout=30)
        outbox.put(echo_pb2.EchoRequest(message="before"))
        assert next(stream).message == "before"

        renewed = tls_ca.issue_server("proxy")  # same files, new key and serial
        assert renewed.serial != first
        proc.send_signal(signal.SIGHUP)
        _wait_event(proc, "config.reloaded", tls_files_reread=True)
        assert _server_serial(port, tls_ca.ca_pem) == renewed.serial
        outbox.put(echo_pb2.EchoRequest(message="after"))  # the stream opened before
        assert next(stream).message == "after"
        outbox.put(None)
        assert list(stream) == []

        # A broken file on reload: logged, and the running certificate stays.
        Path(renewed.cert).write_text("not a certificate\n")
        proc.send_signal(signal.SIGHUP)
        [failed] = _wait_event(proc, "config.reload_failed")
        assert "--tls-cert" in str(failed["error"]) and str(renewed.cert) in str(failed["error"])
        assert _server_serial(port, tls_ca.ca_pem) == renewed.serial
        assert _call(channel)[0].message == "hi"


def test_a_bad_file_at_start_exits_2_naming_the_setting(tmp_path: Path, tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("proxy")
    other = tls_ca.issue_server("other")
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certs.key)], "--tls-cert"),
        (["--tls-cert", str(certs.cert), "--tls-key", str(other.key)], "--tls-cert / --tls-key"),
        (
            ["--backend-tls", "--backend-ca", str(tmp_path / "missing-ca.pem")],
            "--backend-ca",
        ),
    ]
    for flags, setting in cases:
        listen = ["--listen", f"tls:127.0.0.1:{free_port()}"] if "--tls-cert" in flags else []
        result = run_cli("serve", "--backend", "127.0.0.1:1", *listen, *flags, "--admin", "off")
        assert result.returncode == 2, result
        assert result.stderr.startswith(f"grpc-etcd-proxy: serve: {setting}: "), result.stderr


# ---------------------------------------------------------------------------- unix


def test_unix_socket_listener_serves_grpcio(plain_backend: EchoServer) -> None:
    with short_socket_path() as path:
        args = ["serve", "--listen", f"unix:{path}", "--listen", f"127.0.0.1:{free_port()}"]
        with start_proxy([*args, "--backend", plain_backend.address]) as (proc, _):
            with open_channel(f"unix://{path}") as channel:
                assert _call(channel, "unix")[0].message == "unix"
            [access] = _wait_event(proc, "call")
            assert access["peer"] == "unix"
        assert not os.path.exists(path), proxy_output(proc)  # removed at exit


def test_workers_serve_tls_and_each_rereads_the_certificate_on_sighup(
    tls_ca: TestCA, server_certs: CertFiles, plain_backend: EchoServer
) -> None:
    port, admin = free_port(), free_port()
    args = [*_tls_args(server_certs, port), "--backend", plain_backend.address]
    args += ["--workers", "2", "--admin", f"127.0.0.1:{admin}"]
    with start_proxy(args) as (proc, _):
        wait_for(lambda: _admin_ready(admin), "both workers ready", timeout_s=30)
        for _ in range(4):  # new connections, spread over both workers by the kernel
            with open_tls_channel(f"localhost:{port}", tls_ca.ca_pem) as channel:
                assert _call(channel)[0].message == "hi"
        renewed = tls_ca.issue_server("proxy")
        proc.send_signal(signal.SIGHUP)
        # The supervisor's log holds its workers' lines too (they share its stderr).
        _wait_event(proc, "config.reloaded", 2, tls_files_reread=True)
        # Each new connection lands on either worker: all of them see the new certificate.
        serials = {_server_serial(port, tls_ca.ca_pem) for _ in range(8)}
        assert serials == {renewed.serial}


def _admin_ready(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as page:
            return bool(page.status == 200)
    except OSError:
        return False
