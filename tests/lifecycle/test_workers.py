"""`serve --workers 2`: a supervisor and two real worker processes sharing the listen port."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from backends import EchoBackendsFactory
from lifecycle_support import (
    admin_get,
    admin_pool,
    connection_refused,
    eventually,
    exit_code,
    own_channel,
    parent_of,
    pid_alive,
    samples,
    slow_call_at_backend,
    stub,
    unary_on_new_connection,
    wait_for_log,
    wait_ready,
)
from proxy_process import free_port, proxy_output, start_proxy

from proxy_examples.echo import echo_pb2

CALLS = 40


@contextmanager
def workers_proxy(backend: str, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """A supervisor of two workers; yields (supervisor process, port, admin port) once both
    workers are ready."""
    admin = free_port()
    args = ["serve", "--backend", backend, "--workers", "2", "--admin", f"127.0.0.1:{admin}"]
    with start_proxy([*args, *extra]) as (proc, port):
        wait_ready(admin)
        yield proc, port, admin


def worker_pids(admin: int) -> dict[int, int]:
    return {w["worker"]: w["pid"] for w in admin_pool(admin)}


def calls_by_worker(admin: int) -> dict[int, int]:
    return {
        w["worker"]: sum(e["calls_total"] for t in w["targets"] for e in t["endpoints"])
        for w in admin_pool(admin)
    }


def test_two_workers_serve_and_the_admin_reports_both(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with workers_proxy(backend.address) as (proc, port, admin):
        pids = worker_pids(admin)
        assert sorted(pids) == [0, 1]
        assert len(set(pids.values())) == 2
        assert all(parent_of(pid) == proc.pid for pid in pids.values())

        # Each call on a connection of its own: the kernel spreads them over both workers.
        for i in range(CALLS):
            assert unary_on_new_connection(port, f"m{i}") == f"m{i}"
        by_worker = calls_by_worker(admin)
        assert sum(by_worker.values()) == CALLS
        assert all(by_worker[w] > 0 for w in (0, 1)), by_worker

        status, metrics = admin_get(admin, "/metrics")
        assert status == 200
        started = samples(metrics, "grpc_proxy_calls_started_total")
        per_worker = {w: sum(v for k, v in started.items() if f'worker="{w}"' in k) for w in "01"}
        assert per_worker == {"0": by_worker[0], "1": by_worker[1]}
        # HELP and TYPE once per family, not once per worker.
        assert metrics.count("# TYPE grpc_proxy_calls_started_total counter") == 1
        assert samples(metrics, "grpc_proxy_worker_up") == {
            '{worker="0"}': 1.0,
            '{worker="1"}': 1.0,
        }
        assert samples(metrics, "grpc_proxy_workers") == {"": 2.0}

        assert admin_get(admin, "/readyz") == (200, "ready (2 workers)\n")
        assert admin_get(admin, "/healthz")[0] == 200


def test_sigterm_drains_both_workers_and_exits_0(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with workers_proxy(backend.address) as (proc, port, admin):
        pids = worker_pids(admin)
        # Slow calls on connections of their own, so both workers likely have one in flight.
        channels = [own_channel(port) for _ in range(6)]
        calls = [
            stub(ch).UnaryEcho.future(
                echo_pb2.EchoRequest(message=f"slow{i}"), metadata=[("x-echo-delay-ms", "2000")]
            )
            for i, ch in enumerate(channels)
        ]
        eventually(lambda: backend.servicer.calls >= len(calls), 10, "the calls at the backend")
        proc.send_signal(signal.SIGTERM)
        wait_for_log(proc, "draining_workers")
        assert [c.result(timeout=20).message for c in calls] == [f"slow{i}" for i in range(6)]
        assert exit_code(proc, 30) == 0
        assert not any(pid_alive(pid) for pid in pids.values())
        assert connection_refused(port)
        for ch in channels:
            ch.close()


def test_killed_worker_is_restarted(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with workers_proxy(backend.address) as (proc, port, admin):
        before = worker_pids(admin)
        os.kill(before[1], signal.SIGKILL)

        def replaced() -> dict[int, int] | None:
            now = worker_pids(admin)
            return now if now.get(1) not in (None, before[1]) else None

        after = eventually(replaced, 30, "worker 1 to be started again")
        assert after[0] == before[0]  # the other one was left alone
        wait_ready(admin)
        _, metrics = admin_get(admin, "/metrics")
        assert samples(metrics, "grpc_proxy_worker_restarts_total") == {
            '{worker="0"}': 0.0,
            '{worker="1"}': 1.0,
        }
        assert unary_on_new_connection(port) == "hi"
        assert "worker_died" in proxy_output(proc)
        proc.send_signal(signal.SIGTERM)
        assert exit_code(proc, 30) == 0


def test_second_sigterm_kills_the_workers_at_once(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with workers_proxy(backend.address, "--drain-timeout", "60") as (proc, port, admin):
        pids = worker_pids(admin)
        with own_channel(port) as channel:
            call = slow_call_at_backend(channel, backend)
            proc.send_signal(signal.SIGTERM)
            wait_for_log(proc, "draining_workers")
            proc.send_signal(signal.SIGTERM)
            assert exit_code(proc, 10) == 1
            try:
                call.result(timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            else:
                raise AssertionError("the call outlived its worker")
        eventually(lambda: not any(pid_alive(p) for p in pids.values()), 10, "workers gone")


def test_sighup_reloads_every_worker(echo_backends: EchoBackendsFactory, tmp_path: Path) -> None:
    first, second = echo_backends(2)
    config_file = tmp_path / "proxy.toml"
    config_file.write_text(f'backend = ["{first.address}"]\n')
    admin = free_port()
    args = [
        "serve",
        "--config",
        str(config_file),
        "--workers",
        "2",
        "--admin",
        f"127.0.0.1:{admin}",
    ]
    with start_proxy(args) as (proc, port):
        wait_ready(admin)
        config_file.write_text(f'backend = ["{second.address}"]\n')
        proc.send_signal(signal.SIGHUP)

        def endpoints() -> list[list[str]]:
            return [
                [e["address"] for t in w["targets"] for e in t["endpoints"]]
                for w in admin_pool(admin)
            ]

        eventually(
            lambda: endpoints() == [[second.address]] * 2, 15, "both workers on the new backend"
        )
        for _ in range(10):
            unary_on_new_connection(port)
        assert second.servicer.calls == 10
        assert first.servicer.calls == 0
        proc.send_signal(signal.SIGTERM)
        assert exit_code(proc, 30) == 0
