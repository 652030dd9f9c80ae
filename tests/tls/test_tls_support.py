"""The test CA itself: its certificates load into `ssl` and verify (or fail to) as intended.

Handshakes run between two Python `ssl` sockets over real loopback TCP, the server side in a
thread, with `VERIFY_X509_STRICT` on both sides so the certificates also pass the stricter
checks of Python 3.13's defaults, Go and BoringSSL.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tls_support import CertFiles, TestCA

from proxy.core.identity import identity_of

SPIFFE_WEB = "spiffe://example.org/ns/default/sa/web"
TIMEOUT_S = 10.0


def server_context(certs: CertFiles, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certs.cert, certs.key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path, client: CertFiles | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


@dataclass
class Handshake:
    """What each side of one loopback connection saw (a peer cert dict, or the error)."""

    client_saw: dict[str, Any] | None = None
    server_saw: dict[str, Any] | None = None
    client_error: Exception | None = None
    server_error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str = "localhost"
) -> Handshake:
    """Connect `client` to `server` over 127.0.0.1 and exchange one message each way.

    The message matters: in TLS 1.3 the client finishes its handshake before the server has
    checked the client's certificate, so a refused client only finds out on its first read.
    """
    result = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)

        def serve_one() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT_S)
                with server.wrap_socket(conn, server_side=True) as tls:
                    result.server_saw = tls.getpeercert()
                    if tls.recv(5) != b"hello":
                        raise ConnectionError("client sent no hello")
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                result.server_error = exc

        thread = threading.Thread(target=serve_one, name="tls-test-server")
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), TIMEOUT_S) as sock,
                client.wrap_socket(sock, server_hostname=server_hostname) as tls,
            ):
                result.client_saw = tls.getpeercert()
                tls.sendall(b"hello")
                if tls.recv(2) != b"ok":
                    raise ConnectionError("server closed without answering")
        except (OSError, ssl.SSLError) as exc:
            result.client_error = exc
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    return result


def sans(peercert: dict[str, Any] | None) -> set[tuple[str, str]]:
    assert peercert is not None
    return set(peercert.get("subjectAltName", ()))


def verify_message(error: Exception | None) -> str:
    assert isinstance(error, ssl.SSLCertVerificationError), error
    return str(error.verify_message)


def test_server_cert_verifies_against_its_ca(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("server")
    assert (certs.cert, certs.key, certs.ca) == (
        tls_ca.dir / "server.crt",
        tls_ca.dir / "server.key",
        tls_ca.ca_pem,
    )
    result = handshake(server_context(certs), client_context(certs.ca))
    assert result.ok, result
    assert sans(result.client_saw) == {("DNS", "localhost"), ("IP Address", "127.0.0.1")}
    assert result.client_saw is not None
    assert int(result.client_saw["serialNumber"], 16) == certs.serial


def test_server_cert_verifies_by_ip(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("server")
    result = handshake(server_context(certs), client_context(certs.ca), "127.0.0.1")
    assert result.ok, result


def test_hostname_not_in_the_sans_fails(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("server", dns=("backend.test",), ips=())
    assert handshake(server_context(certs), client_context(certs.ca), "backend.test").ok
    result = handshake(server_context(certs), client_context(certs.ca), "localhost")
    assert "Hostname mismatch" in verify_message(result.client_error)


def test_expired_server_cert_fails(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("server", expired=True)
    result = handshake(server_context(certs), client_context(certs.ca))
    assert verify_message(result.client_error) == "certificate has expired"


def test_not_yet_valid_server_cert_fails(tls_ca: TestCA) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    certs = tls_ca.issue_server("server", not_before=soon, not_after=soon + datetime.timedelta(1))
    result = handshake(server_context(certs), client_context(certs.ca))
    assert verify_message(result.client_error) == "certificate is not yet valid"


def test_server_cert_from_other_ca_fails(tls_ca: TestCA, other_ca: TestCA) -> None:
    certs = other_ca.issue_server("server")
    result = handshake(server_context(certs), client_context(tls_ca.ca_pem))
    assert "unable to get local issuer certificate" in verify_message(result.client_error)


def test_client_uri_san_reaches_the_server(tls_ca: TestCA) -> None:
    server = tls_ca.issue_server("server")
    client = tls_ca.issue_client("web", uris=(SPIFFE_WEB,), dns=("web.default.svc",))
    result = handshake(server_context(server, tls_ca.ca_pem), client_context(tls_ca.ca_pem, client))
    assert result.ok, result
    assert sans(result.server_saw) == {("URI", SPIFFE_WEB), ("DNS", "web.default.svc")}
    assert result.server_saw is not None
    assert result.server_saw["subject"] == ((("commonName", "web"),),)
    # What the proxy makes of it: the access log and route_allow use this identity.
    identity = identity_of(result.server_saw)
    assert identity is not None
    assert (identity.primary, identity.common_name) == (SPIFFE_WEB, "web")


def test_client_cn_can_differ_from_the_file_name(tls_ca: TestCA) -> None:
    server = tls_ca.issue_server("server")
    client = tls_ca.issue_client("client", cn="svc-a")
    result = handshake(server_context(server, tls_ca.ca_pem), client_context(tls_ca.ca_pem, client))
    assert result.ok, result
    assert result.server_saw is not None
    assert result.server_saw["subject"] == ((("commonName", "svc-a"),),)
    assert "subjectAltName" not in result.server_saw


@pytest.mark.parametrize("which", ["none", "expired", "other_ca"])
def test_server_refuses_bad_client_certs(tls_ca: TestCA, other_ca: TestCA, which: str) -> None:
    server = tls_ca.issue_server("server")
    client = {
        "none": None,
        "expired": tls_ca.issue_client("web", uris=(SPIFFE_WEB,), expired=True),
        "other_ca": other_ca.issue_client("web", uris=(SPIFFE_WEB,)),
    }[which]
    result = handshake(server_context(server, tls_ca.ca_pem), client_context(tls_ca.ca_pem, client))
    assert result.server_error is not None and result.client_error is not None
    assert result.server_saw is None


def test_client_cert_has_client_auth_usage_only(tls_ca: TestCA) -> None:
    # A client certificate must not double as a server one (and vice versa): tests of
    # "wrong kind of certificate" rely on the extended key usages being exact.
    client = x509.load_pem_x509_certificate(tls_ca.issue_client("web").cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls_ca.issue_server("server").cert.read_bytes())
    usage = x509.ExtendedKeyUsage
    assert list(client.extensions.get_extension_for_class(usage).value) == [
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert list(server.extensions.get_extension_for_class(usage).value) == [
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
    ]


def test_chain_file_lets_a_root_only_client_verify_an_intermediate_leaf(tls_ca: TestCA) -> None:
    intermediate = tls_ca.intermediate("issuing-ca")
    chained = intermediate.issue_server("chained", chain=True)
    bare = intermediate.issue_server("bare")
    assert chained.ca == bare.ca == tls_ca.ca_pem  # peers trust the root
    assert chained.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 3  # leaf, issuing, root
    assert bare.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    assert handshake(server_context(chained), client_context(tls_ca.ca_pem)).ok
    # Without the intermediate in the file, a client that only trusts the root cannot
    # build a path: what a proxy that dropped all but the first certificate would cause.
    result = handshake(server_context(bare), client_context(tls_ca.ca_pem))
    assert "unable to get local issuer certificate" in verify_message(result.client_error)


def test_root_chain_holds_leaf_then_ca(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_server("server", chain=True)
    leaf, ca = x509.load_pem_x509_certificates(certs.cert.read_bytes())
    assert leaf.serial_number == certs.serial
    assert ca == tls_ca.cert
    assert handshake(server_context(certs), client_context(certs.ca)).ok


def test_reissuing_a_name_replaces_its_files(tls_ca: TestCA) -> None:
    first = tls_ca.issue_server("server")
    old_pem = first.cert.read_bytes()
    second = tls_ca.issue_server("server", dns=("localhost", "new.test"))
    assert (second.cert, second.key) == (first.cert, first.key)
    assert second.serial != first.serial
    assert second.cert.read_bytes() != old_pem
    assert sorted(p.name for p in tls_ca.dir.iterdir()) == [
        "server.crt",
        "server.key",
        "test-ca.crt",
        "test-ca.key",
    ]  # no temporary files left behind
    assert handshake(server_context(second), client_context(second.ca), "new.test").ok


def test_key_files_are_private(tls_ca: TestCA) -> None:
    certs = tls_ca.issue_client("web")
    assert certs.key.stat().st_mode & 0o777 == 0o600


def test_leaf_may_not_take_the_ca_file_name(tls_ca: TestCA) -> None:
    with pytest.raises(ValueError, match="CA's own file"):
        tls_ca.issue_server("test-ca")
