"""The supervisor's pure parts: the worker command line and the merging of workers' metrics."""

from __future__ import annotations

import argparse
import dataclasses
import socket

import pytest

from proxy.app import config
from proxy.app.supervisor import WorkerRole, reserve_port, worker_argv, worker_role
from proxy.cli import build_parser
from proxy.ops.workers_admin import merge_families, render_families

SUPERVISOR_ARGV = [
    "serve",
    "--backend",
    "127.0.0.1:7001",
    "--backend=127.0.0.1:7002",
    "--workers",
    "3",
    "--admin",
    "0.0.0.0:9901",
    "--listen",
    ":0",
    "--health-check",
    "--no-health-check",  # the last one wins, as for any flag
    "--health-check-service=-odd-name",  # a value that looks like a flag
    "--policy",
    "least_request",
    "--drain-timeout",
    "7.5",
    "--tls-cert=/etc/proxy/cert.pem",  # only read when serving: need not exist here
    "--tls-key=/etc/proxy/key.pem",
]


def load(argv: list[str]) -> tuple[config.ServeConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    return config.load(config.flag_values(args), {}), args


def test_worker_argv_gives_the_worker_the_same_settings_but_its_own_place() -> None:
    cfg, args = load(SUPERVISOR_ARGV)
    flags = config.flag_values(args)
    listen = (
        config.ListenAddress("0.0.0.0", 40123, tls=False),
        config.ListenAddress("127.0.0.1", 40124, tls=True),
    )
    argv = worker_argv(flags, 1, listen, "/tmp/x/worker-1.sock")
    assert argv[1:4] == ["-m", "proxy", "serve"]
    worker_cfg, worker_args = load(argv[3:])
    assert worker_role(worker_args) == WorkerRole(1, "/tmp/x/worker-1.sock")
    assert (worker_cfg.workers, worker_cfg.admin, worker_cfg.listen) == (1, None, listen)
    assert "--listen=h2c:0.0.0.0:40123" in argv and "--listen=tls:127.0.0.1:40124" in argv
    same = {"workers": 1, "admin": None, "listen": listen}
    assert dataclasses.replace(cfg, **same) == worker_cfg
    assert worker_cfg.health_check_service == "-odd-name"
    assert worker_cfg.backend == ("127.0.0.1:7001", "127.0.0.1:7002")


def test_a_plain_serve_is_no_worker() -> None:
    _, args = load(["serve", "--backend", "127.0.0.1:7001"])
    assert worker_role(args) is None


def test_reserved_port_is_shared_with_reuseport_listeners_only() -> None:
    with reserve_port("127.0.0.1", 0) as held:
        port = held.getsockname()[1]
        assert port != 0
        with socket.socket() as worker:  # what a worker's listen() does
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
        with socket.socket() as stranger, pytest.raises(OSError):
            stranger.bind(("127.0.0.1", port))


WORKER_0 = """\
# HELP grpc_proxy_calls_started_total Calls started.
# TYPE grpc_proxy_calls_started_total counter
grpc_proxy_calls_started_total{backend="a",method="M",service="S"} 3.0
# HELP grpc_proxy_call_duration_seconds Call duration.
# TYPE grpc_proxy_call_duration_seconds histogram
grpc_proxy_call_duration_seconds_bucket{le="0.1",method="M",service="S"} 1.0
grpc_proxy_call_duration_seconds_bucket{le="+Inf",method="M",service="S"} 3.0
grpc_proxy_call_duration_seconds_count{method="M",service="S"} 3.0
grpc_proxy_call_duration_seconds_sum{method="M",service="S"} 0.5
# HELP grpc_proxy_draining 1 while draining.
# TYPE grpc_proxy_draining gauge
grpc_proxy_draining 0.0
"""
WORKER_1 = WORKER_0.replace(" 3.0", " 5.0").replace("draining 0.0", "draining 1.0")


def test_merged_metrics_carry_the_worker_label_and_one_help_per_family() -> None:
    text = render_families(merge_families([(0, WORKER_0), (1, WORKER_1)])).decode()
    lines = text.splitlines()
    assert lines.count("# TYPE grpc_proxy_calls_started_total counter") == 1
    assert lines.count("# TYPE grpc_proxy_call_duration_seconds histogram") == 1
    assert (
        'grpc_proxy_calls_started_total{backend="a",method="M",service="S",worker="0"} 3.0' in lines
    )
    assert (
        'grpc_proxy_calls_started_total{backend="a",method="M",service="S",worker="1"} 5.0' in lines
    )
    assert (
        'grpc_proxy_call_duration_seconds_bucket{le="+Inf",method="M",service="S",worker="1"} 5.0'
        in lines
    )
    assert 'grpc_proxy_draining{worker="0"} 0.0' in lines
    assert 'grpc_proxy_draining{worker="1"} 1.0' in lines
