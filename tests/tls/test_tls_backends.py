"""TLS echo backends on their own (no proxy), called by grpcio TLS clients."""

from __future__ import annotations

import grpc
import pytest
from backends import (
    EchoSubprocessFactory,
    TLSEchoBackendsFactory,
    echo_stub,
    open_channel,
    open_tls_channel,
)
from tls_support import CertFiles, TestCA

from proxy_examples.echo.echo_pb2 import EchoRequest
from proxy_examples.echo.server import main, serve

SPIFFE_WEB = "spiffe://example.org/ns/default/sa/web"
TIMEOUT_S = 10.0


def call(
    address: str,
    ca: TestCA | None,
    client: CertFiles | None = None,
    server_name: str | None = None,
) -> grpc.Call:
    """One UnaryEcho over TLS; returns the call (raises grpc.RpcError on failure)."""
    with open_tls_channel(address, ca.ca_pem if ca else None, client, server_name) as channel:
        resp, rpc = echo_stub(channel).UnaryEcho.with_call(
            EchoRequest(message="hi"), timeout=TIMEOUT_S
        )
        assert resp.message == "hi"
        return rpc


def code_of(address: str, ca: TestCA, client: CertFiles | None = None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(address, ca, client)
    code: grpc.StatusCode = info.value.code()
    return code


def peer_metadata(rpc: grpc.Call) -> list[tuple[str, str]]:
    return [(k, v) for k, v in rpc.initial_metadata() if k.startswith("x-peer-")]


def test_tls_backend_answers_a_tls_client(
    tls_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    backend, second = tls_echo_backends(2, tls_ca.issue_server("backend"))
    rpc = call(backend.address, tls_ca)  # 127.0.0.1: verified against the IP SAN
    assert ("x-backend", "tls0") in rpc.initial_metadata()
    assert peer_metadata(rpc) == []  # no client certificate, nothing to report
    assert second.name == "tls1"


def test_tls_backend_refuses_cleartext(
    tls_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    (backend,) = tls_echo_backends(1, tls_ca.issue_server("backend"))
    with open_channel(backend.address) as channel, pytest.raises(grpc.RpcError) as info:
        echo_stub(channel).UnaryEcho(EchoRequest(message="hi"), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_untrusted_server_cert_is_unavailable(
    tls_ca: TestCA, other_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    (backend,) = tls_echo_backends(1, other_ca.issue_server("backend"))
    assert code_of(backend.address, tls_ca) == grpc.StatusCode.UNAVAILABLE


def test_server_name_override(tls_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory) -> None:
    (backend,) = tls_echo_backends(1, tls_ca.issue_server("backend", dns=("echo.test",), ips=()))
    assert code_of(backend.address, tls_ca) == grpc.StatusCode.UNAVAILABLE
    call(backend.address, tls_ca, server_name="echo.test")


def test_chained_cert_from_an_intermediate(
    tls_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    certs = tls_ca.intermediate().issue_server("backend", chain=True)
    (backend,) = tls_echo_backends(1, certs)
    call(backend.address, tls_ca)  # the client trusts only the root


def test_mutual_tls_requires_a_client_cert(
    tls_ca: TestCA, other_ca: TestCA, tls_echo_backends: TLSEchoBackendsFactory
) -> None:
    (backend,) = tls_echo_backends(1, tls_ca.issue_server("backend"), client_ca=tls_ca.ca_pem)
    assert code_of(backend.address, tls_ca) == grpc.StatusCode.UNAVAILABLE
    stranger = other_ca.issue_client("web", uris=(SPIFFE_WEB,))
    assert code_of(backend.address, tls_ca, stranger) == grpc.StatusCode.UNAVAILABLE
    expired = tls_ca.issue_client("old", expired=True)
    assert code_of(backend.address, tls_ca, expired) == grpc.StatusCode.UNAVAILABLE

    client = tls_ca.issue_client("web", uris=(SPIFFE_WEB,), dns=("web.default.svc",))
    rpc = call(backend.address, tls_ca, client)
    assert peer_metadata(rpc) == [
        ("x-peer-cn", "web"),
        ("x-peer-uri", SPIFFE_WEB),
        ("x-peer-dns", "web.default.svc"),
    ]


def test_tls_subprocess_backend(tls_ca: TestCA, echo_subprocess: EchoSubprocessFactory) -> None:
    proc, port = echo_subprocess(
        "sub", certs=tls_ca.issue_server("backend"), client_ca=tls_ca.ca_pem
    )
    address = f"127.0.0.1:{port}"
    assert code_of(address, tls_ca) == grpc.StatusCode.UNAVAILABLE
    rpc = call(address, tls_ca, tls_ca.issue_client("proxy", cn="grpc-etcd-proxy"))
    assert ("x-backend", "sub") in rpc.initial_metadata()
    assert peer_metadata(rpc) == [("x-peer-cn", "grpc-etcd-proxy")]
    assert proc.poll() is None


def test_tls_settings_go_together(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("backend")
    with pytest.raises(ValueError, match="go together"):
        serve(0, tls_cert=certs.cert)
    with pytest.raises(ValueError, match="needs tls_cert"):
        serve(0, tls_client_ca=certs.ca)
    for argv in (["--tls-cert", str(certs.cert)], ["--tls-client-ca", str(certs.ca)]):
        with pytest.raises(SystemExit) as info:
            main(["--port", "0", *argv])
        assert info.value.code == 2
