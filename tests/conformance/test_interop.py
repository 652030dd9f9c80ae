"""gRPC interoperability through the proxy, with grpc-go's interop client and server.

    interop_client --test_case=X  ->  proxy (python -m proxy serve)  ->  interop_server

``.ci/install-tools.sh`` builds both from grpc-go (``google.golang.org/grpc/interop/client``
and ``.../server``) into ``.tools/bin`` as ``interop_client`` and ``interop_server``.
Each case passes when the client exits 0; on failure its output (and the server's and the
proxy's) is shown.

Harness self-check: ``INTEROP_DIRECT=1`` runs the client straight against the server,
without the proxy; every case passes that way.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_process import (
    free_port,
    proxy_output,
    start_proxy,
    stop_process,
    wait_for_port,
)
from tools import require_tool, tool_env

pytestmark = pytest.mark.needs_tool("interop_client", "interop_server")

CASES = [
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "status_code_and_message",
    "special_status_message",
    "custom_metadata",
    "unimplemented_method",
    "unimplemented_service",
]

CLIENT_TIMEOUT_S = 60
OUTPUT_TAIL_CHARS = 8000


def _direct() -> bool:
    return os.environ.get("INTEROP_DIRECT", "").strip() not in ("", "0", "false", "no")


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL_CHARS else "...\n" + text[-OUTPUT_TAIL_CHARS:]


class InteropServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def interop_server() -> Iterator[InteropServer]:
    binary = require_tool("interop_server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="interop-server-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--port={port}"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=tool_env(),
            )
        server = InteropServer(proc, port, log)
        try:
            try:
                wait_for_port("127.0.0.1", port, 20.0, proc)
            except (RuntimeError, TimeoutError) as exc:
                pytest.fail(f"interop_server did not start: {exc}\n{server.output()}")
            yield server
        finally:
            stop_process(proc)


class Target:
    """Where the client connects: the proxy, or the server itself with INTEROP_DIRECT=1."""

    def __init__(self, port: int, proxy: subprocess.Popen[bytes] | None) -> None:
        self.port = port
        self.proxy = proxy

    def describe(self) -> str:
        return "via proxy" if self.proxy is not None else "direct, no proxy"

    def proxy_output(self) -> str:
        if self.proxy is None:
            return ""
        state = "running" if self.proxy.poll() is None else f"exited {self.proxy.returncode}"
        return f"--- proxy ({state}) ---\n{_tail(proxy_output(self.proxy))}\n"


@pytest.fixture(scope="module")
def target(interop_server: InteropServer) -> Iterator[Target]:
    if _direct():
        yield Target(interop_server.port, None)
        return
    with start_proxy(["serve", "--backend", f"127.0.0.1:{interop_server.port}"]) as (proc, port):
        yield Target(port, proc)


@pytest.mark.parametrize("case", CASES)
def test_interop(case: str, target: Target, interop_server: InteropServer) -> None:
    client = require_tool("interop_client")
    env = tool_env()
    # The client logs each step at INFO; without this a failure shows only its last line.
    env.setdefault("GRPC_GO_LOG_SEVERITY_LEVEL", "info")
    command = [
        client,
        "--server_host=127.0.0.1",
        f"--server_port={target.port}",
        f"--test_case={case}",
    ]
    try:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=CLIENT_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode()
        pytest.fail(
            f"interop case {case} timed out after {CLIENT_TIMEOUT_S}s "
            f"({target.describe()}):\n{_tail(output)}\n{target.proxy_output()}",
            pytrace=False,
        )
    if completed.returncode != 0:
        pytest.fail(
            f"interop case {case} failed with exit code {completed.returncode} "
            f"({target.describe()}): {' '.join(command)}\n"
            f"--- interop_client output ---\n{_tail(completed.stdout)}\n"
            f"--- interop_server output ---\n{_tail(interop_server.output())}\n"
            f"{target.proxy_output()}",
            pytrace=False,
        )
