"""ghz and grpcurl pointed at the proxy just work: with the service's .proto, or with none
(they then ask the server reflection service, which the proxy passes through like any other
call, to one of the backends). Real ghz and grpcurl (grpc-go clients), a real proxy process,
real grpcio backends.

The same over the proxy's other listeners: TLS verified with ``-cacert``/``--cacert``, mutual
TLS with grpcurl's ``-cert``/``-key``, and a Unix socket with ``grpcurl -unix``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest
from backends import REPO_ROOT, EchoBackendsFactory
from proxy_process import log_events, short_socket_path, start_proxy, tls_listen_args, wait_for
from relay_support import ProxyFactory
from tls_support import TestCA
from tools import require_tool, tool_env

CALLS = 60
# What `grpcurl list` finds by reflection through the proxy, at least.
SERVICES = {"echo.Echo", "grpc.health.v1.Health"}
# The client identity (URI SAN) of grpcurl's certificate against the mutual-TLS listener.
GRPCURL_IDENTITY = "spiffe://example.org/ns/test/sa/grpcurl"
# How each tool is told to speak cleartext HTTP/2 (the default of the tests below).
GHZ_PLAINTEXT = ("--insecure",)
GRPCURL_PLAINTEXT = ("-plaintext",)


def ghz(
    address: str, *args: str, calls: int = CALLS, security: Sequence[str] = GHZ_PLAINTEXT
) -> dict[str, Any]:
    """Run ghz against the proxy at ``address`` (HOST:PORT); its JSON report. ``security``:
    the TLS flags (``--cacert=...``), cleartext by default."""
    binary = require_tool("ghz")
    argv = [binary, *security, "--call", "echo.Echo/UnaryEcho", "--format", "json"]
    argv += ["-d", '{"message": "hi"}', "-n", str(calls), "-c", "4", *args, address]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=tool_env())
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.needs_tool("ghz")
@pytest.mark.parametrize("proto", [True, False], ids=["with-proto", "by-reflection"])
def test_ghz_through_the_proxy_spreads_its_calls(
    proto: bool, echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    servers = echo_backends(3)
    proxy = run_proxy(*(s.address for s in servers))
    args = ["--proto", str(REPO_ROOT / "protos" / "echo.proto")] if proto else []
    # A deadline on every call: grpc-go sends grpc-timeout, a new value on most calls.
    report = ghz(proxy.target, *args, "--timeout", "10s", "-m", '{"x-trace": "{{.RequestNumber}}"}')

    assert report["count"] == CALLS, report
    assert report["statusCodeDistribution"] == {"OK": CALLS}, report
    assert not report.get("errorDistribution"), report
    calls = [s.servicer.calls for s in servers]
    assert sum(calls) == CALLS, calls
    # Round robin per call over one ghz connection: about a third each (the reflection
    # stream, when there is one, takes a turn too).
    assert all(CALLS // 3 - 2 <= n <= CALLS // 3 + 2 for n in calls), calls


def run_grpcurl(
    address: str,
    *verb: str,
    flags: Sequence[str] = (),
    security: Sequence[str] = GRPCURL_PLAINTEXT,
) -> subprocess.CompletedProcess[str]:
    """``grpcurl SECURITY FLAGS ADDRESS VERB...`` to its end. ``address`` is HOST:PORT, or a
    socket path with ``-unix`` in ``security`` (the TLS or transport flags)."""
    binary = require_tool("grpcurl")
    argv = [binary, *security, *flags, address, *verb]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=tool_env())


def grpcurl(
    address: str,
    *verb: str,
    flags: Sequence[str] = (),
    security: Sequence[str] = GRPCURL_PLAINTEXT,
) -> str:
    """:func:`run_grpcurl`, which must succeed; its output."""
    done = run_grpcurl(address, *verb, flags=flags, security=security)
    assert done.returncode == 0, (done.args, done.stderr)
    return done.stdout


def unary_echo(address: str, message: str, security: Sequence[str]) -> dict[str, Any]:
    """``echo.Echo/UnaryEcho`` with ``message``, by reflection; the reply as JSON."""
    data = json.dumps({"message": message})
    out = grpcurl(address, "echo.Echo/UnaryEcho", flags=("-d", data), security=security)
    reply: dict[str, Any] = json.loads(out)
    return reply


@pytest.mark.needs_tool("grpcurl")
def test_grpcurl_lists_describes_and_calls_through_the_proxy(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    servers = echo_backends(2)
    proxy = run_proxy(*(s.address for s in servers))

    services = grpcurl(proxy.target, "list").split()
    assert set(services) >= SERVICES, services
    described = grpcurl(proxy.target, "describe", "echo.Echo.UnaryEcho")
    assert "rpc UnaryEcho ( .echo.EchoRequest ) returns ( .echo.EchoResponse )" in described

    answered = []
    for i in range(4):
        flags = ("-v", "-d", f'{{"message": "hi {i}"}}', "-H", "x-echo-meta-k: v")
        out = grpcurl(proxy.target, "echo.Echo/UnaryEcho", flags=flags)
        # -v prints the response headers, the message and the trailers: the metadata went to
        # the backend and came back in both.
        headers = out[out.index("Response headers received:") : out.index("Response contents:")]
        trailers = out[out.index("Response trailers received:") :]
        assert "x-echo-meta-k: v" in headers and "x-echo-meta-k: v" in trailers, out
        reply = json.loads(out[out.index("{") : out.rindex("}") + 1])
        assert reply["message"] == f"hi {i}", reply
        answered.append(reply["backend"])
    assert sorted(answered) == sorted(
        name for s in servers for name in [s.name] * s.servicer.calls
    ), answered


@pytest.mark.needs_tool("grpcurl")
def test_grpcurl_verifies_a_tls_listener_with_cacert(
    tls_ca: TestCA, other_ca: TestCA, echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    [backend] = echo_backends(1)
    # Valid for 127.0.0.1, the host grpcurl dials and checks.
    listener = tls_listen_args(tls_ca.issue_server("proxy"))
    proxy = run_proxy(backend.address, extra_args=tuple(listener))
    verified = ("-cacert", str(tls_ca.ca_pem))

    services = grpcurl(proxy.target, "list", security=verified).split()
    assert set(services) >= SERVICES, services
    reply = unary_echo(proxy.target, "over tls", verified)
    assert (reply["message"], reply["backend"]) == ("over tls", backend.name), reply

    # The verification is real: a certificate of a CA grpcurl does not trust is refused.
    refused = run_grpcurl(proxy.target, "list", security=("-cacert", str(other_ca.ca_pem)))
    assert refused.returncode != 0, refused.stdout
    assert "certificate signed by unknown authority" in refused.stderr, refused.stderr


@pytest.mark.needs_tool("grpcurl")
def test_grpcurl_presents_its_certificate_to_a_mutual_tls_listener(
    tls_ca: TestCA, echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    [backend] = echo_backends(1)
    listener = tls_listen_args(tls_ca.issue_server("proxy"), client_ca=tls_ca.ca_pem)
    proxy = run_proxy(backend.address, extra_args=tuple(listener))
    client = tls_ca.issue_client("grpcurl", uris=(GRPCURL_IDENTITY,))
    ca = ("-cacert", str(tls_ca.ca_pem))

    reply = unary_echo(
        proxy.target, "mtls", (*ca, "-cert", str(client.cert), "-key", str(client.key))
    )
    assert reply["message"] == "mtls", reply

    # The proxy saw the identity in grpcurl's certificate (the call before it was reflection's).
    def echo_calls() -> list[dict[str, Any]]:
        return [e for e in log_events(proxy.proc, "call") if e["service"] == "echo.Echo"]

    wait_for(echo_calls, "the proxy's access log of the echo call")
    [call] = echo_calls()
    assert (call["method"], call["client"]) == ("UnaryEcho", GRPCURL_IDENTITY), call

    # Without a certificate the handshake fails, so the listener really asks for one. (grpcurl
    # can only say "EOF": the proxy closes without the TLS alert, as asyncio and uvloop do,
    # CPython gh-98078.)
    refused = run_grpcurl(proxy.target, "list", security=ca)
    assert refused.returncode != 0, refused.stdout


@pytest.mark.needs_tool("grpcurl")
def test_grpcurl_through_a_unix_socket_listener(echo_backends: EchoBackendsFactory) -> None:
    [backend] = echo_backends(1)
    unix = (*GRPCURL_PLAINTEXT, "-unix")
    # start_proxy adds a TCP listener after the Unix one and waits for it (see there).
    with (
        short_socket_path() as path,
        start_proxy(["serve", "--listen", f"unix:{path}", "--backend", backend.address]),
    ):
        services = grpcurl(path, "list", security=unix).split()
        assert set(services) >= SERVICES, services
        reply = unary_echo(path, "over unix", unix)
        assert reply["message"] == "over unix", reply


@pytest.mark.needs_tool("ghz")
def test_ghz_through_a_tls_listener(
    tls_ca: TestCA, echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    servers = echo_backends(2)
    listener = tls_listen_args(tls_ca.issue_server("proxy"))
    proxy = run_proxy(*(s.address for s in servers), extra_args=tuple(listener))
    calls = 200
    proto = ("--proto", str(REPO_ROOT / "protos" / "echo.proto"))
    report = ghz(proxy.target, *proto, calls=calls, security=(f"--cacert={tls_ca.ca_pem}",))

    assert report["count"] == calls, report
    assert report["statusCodeDistribution"] == {"OK": calls}, report
    assert not report.get("errorDistribution"), report
    assert sum(s.servicer.calls for s in servers) == calls
