"""SIGHUP reloads routes and balancing from the file and the environment, under traffic,
without a failed call: real proxy processes, real grpcio backends and clients, a real etcd for
the routes. Each test waits for the proxy's own log line saying the reload happened, never
for a fixed time."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

from backends import EchoBackendsFactory, echo_stub, open_channel
from config_support import Traffic, register, wait_serving
from etcd_support import EtcdServer
from proxy_process import free_port, log_events, start_proxy, wait_for

from proxy_examples.echo import echo_pb2

CALLERS = 4
STREAM_MESSAGES = 20


def reload(proc: subprocess.Popen[bytes], event: str = "config.reloaded") -> dict[str, object]:
    """SIGHUP, then the log line `event` that it caused."""
    before = len(log_events(proc, event))
    proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: len(log_events(proc, event)) > before, f"the proxy to log {event}", timeout_s=15.0
    )
    return log_events(proc, event)[-1]


def admin_get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body


def watched_targets(admin: int) -> list[str]:
    """The targets in the proxy's /pool that have an etcd watch."""
    (worker,) = json.loads(admin_get(admin, "/pool"))["workers"]
    return sorted(t["target"] for t in worker["targets"] if t["watch"] is not None)


def answers_after_now(traffic: Traffic, calls: int = 60) -> dict[str, int]:
    """Who answers `calls` calls started from now on. A call in flight now may have been
    picked before the reload, and may be answered after later ones: it does not count."""
    first = traffic.started()
    wait_for(
        lambda: traffic.answered_from(first, calls) is not None,
        f"{calls} more calls",
        timeout_s=15.0,
    )
    answered = traffic.answered_from(first, calls)
    assert answered is not None
    return dict(answered)


def test_sighup_swaps_backends_and_policy_under_traffic_without_failed_calls(
    tmp_path: Path, echo_backends: EchoBackendsFactory
) -> None:
    b0, b1, b2 = echo_backends(3)
    path = tmp_path / "proxy.toml"
    path.write_text(f'backend = ["{b0.address}"]\npolicy = "round_robin"\n')
    with start_proxy(["serve", "--config", str(path)]) as (proc, port):
        target = f"127.0.0.1:{port}"
        with open_channel(target) as stream_channel, Traffic(target, CALLERS) as traffic:
            # A stream that outlives the reload: it must stay on its backend to the end.
            stream = echo_stub(stream_channel).ServerStreamingEcho(
                echo_pb2.EchoRequest(message="s", count=STREAM_MESSAGES),
                metadata=[("x-echo-interval-ms", "100")],
                timeout=60,
            )
            first = next(stream)
            assert answers_after_now(traffic) == {b0.name: 60}

            path.write_text(
                f'backend = ["{b1.address}", "{b2.address}"]\npolicy = "least_request"\n'
            )
            line = reload(proc)
            assert line["changed"] == ["backend", "policy"], line
            after = answers_after_now(traffic)
            assert set(after) == {b1.name, b2.name}, after

            rest = list(stream)
            traffic.stop()
            assert traffic.errors == [], traffic.errors[:5]
        assert [first.backend, *(r.backend for r in rest)] == [b0.name] * STREAM_MESSAGES


def test_a_bad_file_on_reload_is_ignored_and_unreloadable_changes_are_logged(
    tmp_path: Path, echo_backends: EchoBackendsFactory
) -> None:
    b0, b1 = echo_backends(2)
    path = tmp_path / "proxy.toml"
    path.write_text(f'backend = ["{b0.address}"]\n')
    with start_proxy(["serve", "--config", str(path)]) as (proc, port):
        with Traffic(f"127.0.0.1:{port}", CALLERS) as traffic:
            assert answers_after_now(traffic) == {b0.name: 60}

            path.write_text(f'backend = ["{b1.address}"\n')  # not TOML
            failed = reload(proc, "config.reload_failed")
            assert "not valid TOML" in str(failed["error"]), failed
            path.write_text(f'backend = ["{b1.address}"]\npolicy = "fastest"\n')
            failed = reload(proc, "config.reload_failed")
            assert "policy: expected one of" in str(failed["error"]), failed
            assert answers_after_now(traffic) == {b0.name: 60}

            # Connection limits and the process layout cannot change under running clients:
            # kept, and said so; the rest of the file applies.
            path.write_text(
                f'backend = ["{b1.address}"]\nmax_concurrent_streams = 10\nworkers = 2\n'
                "access_log_sample = 0\n"
            )
            proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: log_events(proc, "config.restart_needed"), "restart_needed", timeout_s=15.0
            )
            line = log_events(proc, "config.restart_needed")[-1]
            assert line["settings"] == ["max_concurrent_streams", "workers"], line
            wait_for(
                lambda: log_events(proc, "config.reloaded"), "the rest applied", timeout_s=15.0
            )
            line = log_events(proc, "config.reloaded")[-1]
            assert line["changed"] == ["backend", "access_log_sample"], line
            assert answers_after_now(traffic) == {b1.name: 60}

            traffic.stop()
            assert traffic.errors == [], traffic.errors[:5]
            # The access log was on for b0's calls and is off for b1's.
            logged = Counter(line["backend"] for line in log_events(proc, "call"))
            assert logged[b0.address] >= 60 and logged[b1.address] == 0, logged
        assert proc.poll() is None


def test_sighup_routes_a_service_to_a_target_not_watched_before(
    tmp_path: Path, echo_backends: EchoBackendsFactory, etcd: EtcdServer
) -> None:
    a0, b0 = echo_backends(2)
    register(etcd, f"a/{a0.address}", a0.address)
    register(etcd, f"b/{b0.address}", b0.address)
    path = tmp_path / "proxy.toml"
    path.write_text(f'etcd = "{etcd.endpoint}"\ntarget = "a"\n')
    admin = free_port()
    args = ["serve", "--config", str(path), "--admin", f"127.0.0.1:{admin}"]
    with start_proxy(args) as (proc, port):
        # Calls before the first etcd listing fail by design (UNAVAILABLE, with the reason).
        wait_serving(f"127.0.0.1:{port}")
        with Traffic(f"127.0.0.1:{port}", CALLERS) as traffic:
            assert answers_after_now(traffic) == {a0.name: 60}

            # Target b gets its etcd watch now; calls move once its first listing is in.
            path.write_text(f'etcd = "{etcd.endpoint}"\ntarget = "a"\n[route]\n"echo.Echo" = "b"\n')
            line = reload(proc)
            assert line["changed"] == ["route"], line
            assert answers_after_now(traffic) == {b0.name: 60}

            path.write_text(f'etcd = "{etcd.endpoint}"\ntarget = "b"\nroute = []\n')
            reload(proc)
            assert answers_after_now(traffic) == {b0.name: 60}
            path.write_text(f'etcd = "{etcd.endpoint}"\ntarget = "a"\n')
            reload(proc)
            assert answers_after_now(traffic) == {a0.name: 60}
            # Each reload stopped the watch of the target it no longer routes to (a, then b;
            # a was watched again from its first listing), and b left /pool and the metrics.
            dropped = [line["targets"] for line in log_events(proc, "discovery.targets_dropped")]
            assert dropped == [["a"], ["b"]], dropped
            assert watched_targets(admin) == ["a"]
            metrics = admin_get(admin, "/metrics").decode()
            assert 'grpc_proxy_etcd_watch_up{target="a"} 1.0' in metrics, metrics
            assert 'target="b"' not in metrics, metrics

            traffic.stop()
            assert traffic.errors == [], traffic.errors[:5]
