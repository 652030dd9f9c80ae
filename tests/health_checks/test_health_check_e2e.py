"""`serve --health-check` in a real proxy process over real grpcio backends: a backend that says
NOT_SERVING stops getting calls, and gets them again once it says SERVING. Which backend took
a call is read from the answer (and the backend's own call count), never from timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from typing import Any

import grpc
from backends import EchoBackendsFactory, EchoSubprocessFactory, echo_stub, open_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxy_process import free_port, proxy_output, start_proxy, wait_for

from proxy_examples.echo import echo_pb2

WAIT = 30.0


def answered_by(channel: grpc.Channel, calls: int) -> list[str]:
    stub = echo_stub(channel)
    request = echo_pb2.EchoRequest(message="hi")
    return [stub.UnaryEcho(request, timeout=10).backend for _ in range(calls)]


def admin_get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body


def pool_endpoint(admin: int, address: str) -> dict[str, Any]:
    pool = json.loads(admin_get(admin, "/pool"))
    for worker in pool["workers"]:
        for target in worker["targets"]:
            for endpoint in target["endpoints"]:
                if endpoint["address"] == address:
                    return dict(endpoint)
    raise AssertionError(f"{address} not in /pool: {pool}")


def health_changes(proc: subprocess.Popen[bytes], address: str) -> list[str]:
    """The statuses of the proxy's backend_health_changed lines for ``address`` (JSON logs)."""
    statuses = []
    for line in proxy_output(proc).splitlines():
        if "backend_health_changed" in line and address in line:
            statuses.append(json.loads(line)["status"])
    return statuses


def test_a_backend_flipped_to_not_serving_gets_no_calls_until_it_serves_again(
    echo_backends: EchoBackendsFactory,
) -> None:
    servers = echo_backends(3)
    b1 = servers[1]
    admin = free_port()
    args = ["serve", "--health-check", "--health-check-interval", "0.2"]
    args += ["--health-check-timeout", "2", "--admin", f"127.0.0.1:{admin}"]
    args += ["--log-format", "json"]
    for server in servers:
        args += ["--backend", server.address]
    everyone = {s.name for s in servers}
    with start_proxy(args) as (proc, _port), open_channel(f"127.0.0.1:{_port}") as channel:
        wait_for(
            lambda: set(answered_by(channel, 9)) == everyone,
            "all 3 backends to answer",
            timeout_s=WAIT,
        )
        # Each backend's first check runs at a random point of the first interval: wait until
        # all three have answered SERVING, so that what follows starts from a known state (on
        # a fast machine the rest of the test can finish before b0's first check).
        wait_for(
            lambda: all(pool_endpoint(admin, s.address)["health"] == "serving" for s in servers),
            "all 3 backends to be checked SERVING",
            timeout_s=WAIT,
        )

        b1.set_health(False)
        # Out within about an interval; 30 calls in a row that b1 is not among is the sign.
        wait_for(
            lambda: b1.name not in answered_by(channel, 30),
            "b1 to stop getting calls",
            timeout_s=WAIT,
        )
        before = b1.servicer.calls
        answers = answered_by(channel, 60)
        assert b1.name not in answers
        assert set(answers) == everyone - {b1.name}
        assert b1.servicer.calls == before, "a call reached the NOT_SERVING backend"

        endpoint = pool_endpoint(admin, b1.address)
        assert endpoint["health"] == "not_serving"
        assert endpoint["state"] == "unhealthy"
        assert pool_endpoint(admin, servers[0].address)["health"] == "serving"
        metrics = admin_get(admin, "/metrics").decode()
        checks = [
            line
            for line in metrics.splitlines()
            if line.startswith("grpc_proxy_health_checks_total{")
            and f'backend="{b1.address}"' in line
            and 'result="not_serving"' in line
        ]
        assert checks and float(checks[0].rsplit(" ", 1)[1]) >= 1, metrics

        b1.set_health(True)
        wait_for(
            lambda: b1.name in answered_by(channel, 30), "b1 to get calls again", timeout_s=WAIT
        )
        assert b1.servicer.calls > before
        # One line per change, not one per check (there were many checks meanwhile).
        assert health_changes(proc, b1.address) == ["not_serving", "serving"], proxy_output(proc)


def test_echo_backend_process_flips_its_health_on_sigusr1_and_sigusr2(
    echo_subprocess: EchoSubprocessFactory,
) -> None:
    proc, port = echo_subprocess("sig")

    def status() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            return int(response.status)

    assert status() == health_pb2.HealthCheckResponse.SERVING
    proc.send_signal(signal.SIGUSR1)
    wait_for(
        lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING,
        "NOT_SERVING",
        timeout_s=WAIT,
    )
    proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "SERVING", timeout_s=WAIT)
