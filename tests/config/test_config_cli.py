"""`grpc-etcd-proxy serve` as users run it, with a config file, variables and flags: which
source wins, and that a bad setting anywhere exits 2 naming the setting and its source."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from backends import EchoBackendsFactory, echo_stub, open_channel
from proxy_process import log_events, run_cli, start_proxy

from proxy_examples.echo import echo_pb2


def answering_backend(port: int) -> str:
    with open_channel(f"127.0.0.1:{port}") as channel:
        reply = echo_stub(channel).UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=10)
    return str(reply.backend)


def test_flags_beat_variables_beat_the_file(
    tmp_path: Path, echo_backends: EchoBackendsFactory
) -> None:
    from_file, from_env, from_flag = echo_backends(3)
    path = tmp_path / "proxy.toml"
    path.write_text(f'backend = ["{from_file.address}"]\npolicy = "random"\n')
    env_var = {"GRPC_ETCD_PROXY_BACKEND": from_env.address}

    with start_proxy(["serve", "--config", str(path)], env=_env()) as (_, port):
        assert answering_backend(port) == from_file.name
    with start_proxy(["serve"], env=env_var | _env(config=str(path))) as (_, port):
        assert answering_backend(port) == from_env.name
    flags = ["serve", "--config", str(path), "--backend", from_flag.address]
    with start_proxy(flags, env=env_var | _env()) as (_, port):
        assert answering_backend(port) == from_flag.name


def _env(**settings: str) -> dict[str, str]:
    """os.environ without GRPC_ETCD_PROXY_* variables, plus these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_ETCD_PROXY_")}
    env.update({f"GRPC_ETCD_PROXY_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            'backend = ["127.0.0.1:1"]\npolicy = "foo"\n',
            "policy: expected one of round_robin, least_request, random, got 'foo'",
        ),
        ('backend = ["127.0.0.1:1"]\nadmin = 9901\n', "admin: expected a string, got 9901"),
        ('backend = ["127.0.0.1:1"]\ndrian_timeout = 5\n', "drian_timeout: unknown setting"),
        ('backend = ["127.0.0.1:1"\n', "not valid TOML"),
    ],
    ids=["bad-value", "bad-type", "unknown-key", "bad-syntax"],
)
def test_bad_file_exits_2_naming_file_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2, result
    assert f"grpc-etcd-proxy: config file {path}: " in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"GRPC_ETCD_PROXY_DRAIN_TIMEOUT": "soon"},
            "environment GRPC_ETCD_PROXY_DRAIN_TIMEOUT: expected a number of seconds >= 0",
        ),
        (
            {"GRPC_ETCD_PROXY_DRAIN_TIMOUT": "5"},
            "environment GRPC_ETCD_PROXY_DRAIN_TIMOUT: unknown setting (did you mean "
            "GRPC_ETCD_PROXY_DRAIN_TIMEOUT?)",
        ),
        (
            {"GRPC_ETCD_PROXY_CONFIG": "/nonexistent/proxy.toml"},
            "config file /nonexistent/proxy.toml: cannot read it",
        ),
    ],
    ids=["bad-value", "unknown-variable", "missing-file"],
)
def test_bad_variable_exits_2_naming_it(env: dict[str, str], expected: str) -> None:
    # A flag for the same setting does not excuse a bad variable: every source is checked.
    result = run_cli("serve", "--backend", "127.0.0.1:1", "--drain-timeout", "1", env=env)
    assert result.returncode == 2, result
    assert f"grpc-etcd-proxy: {expected}" in result.stderr, result.stderr


def test_bad_flag_exits_2_naming_it() -> None:
    result = run_cli("serve", "--backend", "127.0.0.1:1", "--admin", "localhost")
    assert result.returncode == 2, result
    assert "grpc-etcd-proxy: --admin: expected HOST:PORT or 'off', got 'localhost'" in (
        result.stderr
    )


def test_a_taken_admin_port_exits_1_saying_so(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--backend", backend.address, "--admin", f"127.0.0.1:{port}")
    assert result.returncode == 1, result
    assert f"grpc-etcd-proxy: --admin 127.0.0.1:{port}: cannot listen" in result.stderr, (
        result.stderr
    )


def test_admin_off_serves_without_an_admin_port(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with start_proxy(["serve", "--backend", backend.address]) as (proc, port):
        assert answering_backend(port) == backend.name
        assert log_events(proc, "admin_listening"), "start_proxy gives serve an admin port"
    with start_proxy(["serve", "--backend", backend.address, "--admin", "off"]) as (proc, port):
        assert answering_backend(port) == backend.name
        assert log_events(proc, "listening")
        assert not log_events(proc, "admin_listening")
