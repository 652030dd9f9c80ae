"""ghz and grpcurl pointed at the proxy just work: with the service's .proto, or with none
(they then ask the server reflection service, which the proxy passes through like any other
call, to one of the backends). Real ghz and grpcurl (grpc-go clients), a real proxy process,
real grpcio backends.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from backends import REPO_ROOT, EchoBackendsFactory
from relay_support import ProxyFactory
from tools import require_tool, tool_env

CALLS = 60


def ghz(port: int, *args: str) -> dict[str, Any]:
    """Run ghz against the proxy; its JSON report."""
    binary = require_tool("ghz")
    argv = [binary, "--insecure", "--call", "echo.Echo/UnaryEcho", "--format", "json"]
    argv += ["-d", '{"message": "hi"}', "-n", str(CALLS), "-c", "4", *args, f"127.0.0.1:{port}"]
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
    report = ghz(proxy.port, *args, "--timeout", "10s", "-m", '{"x-trace": "{{.RequestNumber}}"}')

    assert report["count"] == CALLS, report
    assert report["statusCodeDistribution"] == {"OK": CALLS}, report
    assert not report.get("errorDistribution"), report
    calls = [s.servicer.calls for s in servers]
    assert sum(calls) == CALLS, calls
    # Round robin per call over one ghz connection: about a third each (the reflection
    # stream, when there is one, takes a turn too).
    assert all(CALLS // 3 - 2 <= n <= CALLS // 3 + 2 for n in calls), calls


def grpcurl(port: int, *verb: str, flags: tuple[str, ...] = ()) -> str:
    """``grpcurl -plaintext FLAGS 127.0.0.1:PORT VERB...``; its output."""
    binary = require_tool("grpcurl")
    argv = [binary, "-plaintext", *flags, f"127.0.0.1:{port}", *verb]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=tool_env())
    assert done.returncode == 0, (argv, done.stderr)
    return done.stdout


@pytest.mark.needs_tool("grpcurl")
def test_grpcurl_lists_describes_and_calls_through_the_proxy(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    servers = echo_backends(2)
    proxy = run_proxy(*(s.address for s in servers))

    services = grpcurl(proxy.port, "list").split()
    assert {"echo.Echo", "grpc.health.v1.Health"} <= set(services), services
    described = grpcurl(proxy.port, "describe", "echo.Echo.UnaryEcho")
    assert "rpc UnaryEcho ( .echo.EchoRequest ) returns ( .echo.EchoResponse )" in described

    answered = []
    for i in range(4):
        flags = ("-v", "-d", f'{{"message": "hi {i}"}}', "-H", "x-echo-meta-k: v")
        out = grpcurl(proxy.port, "echo.Echo/UnaryEcho", flags=flags)
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
