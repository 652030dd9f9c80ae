"""`grpc-etcd-proxy demo` end to end: a subprocess, its output, and calls through its proxy.

grpcio client (this test)  ->  demo's proxy  ->  demo's three echo backends
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from proxy_process import REPO_ROOT, free_port, stop_process, wait_for_port

DURATION_S = 4
BACKENDS = {"backend-1", "backend-2", "backend-3"}
CALL = re.compile(r"^call (\d+): (?:answered by (\S+)|failed: (.*))$")
STOPPING = re.compile(r"^stopping (\S+) ")


def run_demo_and_call_through_it(port: int) -> tuple[int, str, str, set[str]]:
    """Run the demo; while it runs, list services by reflection and check health through its
    proxy. Returns (exit code, stdout, stderr, the services reflection listed)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "demo",
            "--duration",
            str(DURATION_S),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", port, 20.0, proc)
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "echo.Echo"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            replies = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        assert len(replies) == 1
        services = {s.name for s in replies[0].list_services_response.service}
        stdout, stderr = proc.communicate(timeout=DURATION_S + 30)
    finally:
        stop_process(proc)
    return proc.returncode, stdout.decode(), stderr.decode(), services


def test_demo_balances_survives_a_stopped_backend_and_passes_reflection_and_health() -> None:
    port = free_port()
    code, out, err, services = run_demo_and_call_through_it(port)
    context = f"--- stdout ---\n{out}--- stderr ---\n{err}"
    assert code == 0, context
    assert {"echo.Echo", "grpc.health.v1.Health"} <= services, services

    lines = out.splitlines()
    assert f"grpcurl -plaintext 127.0.0.1:{port} list" in out, context
    assert any(line.startswith("try: ghz --insecure") for line in lines), context

    before: set[str] = set()
    after: set[str] = set()
    stopped = None
    failures = []
    for line in lines:
        if match := STOPPING.match(line):
            stopped = match.group(1)
        elif match := CALL.match(line):
            if match.group(3) is not None:
                failures.append(line)
            else:
                (after if stopped else before).add(match.group(2))
    assert before == BACKENDS, context
    assert stopped in BACKENDS, context
    assert after, f"no call answered after {stopped} stopped\n{context}"
    assert stopped not in after, context
    assert len(after) < len(BACKENDS)
    assert not failures, context
    assert lines[-1].startswith("done: answers by backend:"), context
