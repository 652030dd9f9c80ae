"""The command line, run as users run it: `python -m proxy ...` in a subprocess."""

from __future__ import annotations

import subprocess

import proxy_process
import pytest

from proxy import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return proxy_process.run_cli(*args, timeout=30)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["serve", "--listen", "nonsense", "--backend", "127.0.0.1:1"], "--listen"),
        (["serve", "--listen", "127.0.0.1:65536", "--backend", "127.0.0.1:1"], "--listen"),
        (["serve", "--backend", "x:0"], "--backend"),
        (["serve", "--backend", "no-port"], "--backend"),
        (
            ["serve", "--backend", "127.0.0.1:1", "--max-concurrent-streams", "0"],
            "--max-concurrent-streams",
        ),
        (["serve", "--backend", "127.0.0.1:1", "--stream-window", "-5"], "--stream-window"),
        (["serve", "--backend", "127.0.0.1:1", "--max-retries", "x"], "--max-retries"),
        (["serve", "--backend", "127.0.0.1:1", "--max-retries", "-1"], "--max-retries"),
        (["serve", "--backend", "127.0.0.1:1", "--drain-timeout", "soon"], "--drain-timeout"),
        (["serve", "--backend", "127.0.0.1:1", "--admin", "nowhere"], "--admin"),
        (["serve", "--backend", "127.0.0.1:1", "--log-format", "xml"], "--log-format"),
        (["serve", "--backend", "127.0.0.1:1", "--log-level", "loud"], "--log-level"),
        (["serve"], "--backend"),
        (["serve", "--no-such-flag"], "--no-such-flag"),
        (["demo", "--duration", "0"], "--duration"),
        (["demo", "--duration", "soon"], "--duration"),
        (["demo", "--duration", "nan"], "--duration"),
        (["demo", "--listen", "nonsense"], "--listen"),
    ],
)
def test_bad_flag_exits_2_naming_it(args: list[str], flag: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert flag in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_no_command_exits_2() -> None:
    result = run_cli()
    assert result.returncode == 2, result
    assert "COMMAND" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["serve", "demo"]),
        (
            ["serve", "--help"],
            ["--listen", "--backend", "--max-concurrent-streams", "--config", "--admin"],
        ),
        (["demo", "--help"], ["--duration", "--listen"]),
    ],
)
def test_help_exits_0(args: list[str], expected: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result
    for word in expected:
        assert word in result.stdout, result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result
    # The build of the data path follows in brackets (tests/test_build.py checks which).
    assert result.stdout.startswith(f"grpc-etcd-proxy {__version__} ("), result.stdout
