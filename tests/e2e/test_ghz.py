"""ghz pointed at the proxy just works: with the service's .proto, or with none (ghz then asks
the server reflection service, which the proxy passes through like any other call, to one of
the backends). Real ghz (a grpc-go client), a real proxy process, real grpcio backends.
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
