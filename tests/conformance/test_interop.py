"""gRPC interoperability through the proxy, with grpc-go's interop client and server.

    interop_client --test_case=X  ->  proxy (python -m proxy serve)  ->  interop_server

Every case runs over each of the client's ways in (``TRANSPORTS``):

    h2c   cleartext TCP to the proxy, cleartext to the server
    tls   ``--use_tls`` to a TLS listener of the proxy, which dials the server (itself run
          with ``--use_tls`` and a certificate of the same test CA) with ``--backend-tls
          --backend-ca``
    unix  a Unix socket listener of the proxy, cleartext to the server

``.ci/install-tools.sh`` builds both from grpc-go (``google.golang.org/grpc/interop/client``
and ``.../server``) into ``.tools/bin`` as ``interop_client`` and ``interop_server``.
Each case passes when the client exits 0; on failure its output (and the server's and the
proxy's) is shown. One proxy and one server per transport serve all its cases.

Harness self-check: ``INTEROP_DIRECT=1`` runs the client straight against the server,
without the proxy; every case passes that way (the server listens on TCP only, so the
unix cases skip).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_process import (
    free_port,
    proxy_output,
    short_socket_path,
    start_proxy,
    stop_process,
    tls_listen_args,
    wait_for_port,
)
from tls_support import CertFiles, TestCA
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

TRANSPORTS = ["h2c", "tls", "unix"]

# The name the client checks in the proxy's certificate (and sends as SNI and :authority):
# not the address it dials, so that the override really is what gets verified.
PROXY_TLS_NAME = "proxy.interop.test"

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


@contextlib.contextmanager
def running_interop_server(certs: CertFiles | None = None) -> Iterator[InteropServer]:
    """``interop_server`` on a free port; with ``--use_tls`` and ``certs`` when given."""
    binary = require_tool("interop_server")
    port = free_port()
    command = [binary, f"--port={port}"]
    if certs is not None:
        command += ["--use_tls", f"--tls_cert_file={certs.cert}", f"--tls_key_file={certs.key}"]
    with tempfile.TemporaryDirectory(prefix="interop-server-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
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


@pytest.fixture(scope="module")
def interop_server() -> Iterator[InteropServer]:
    with running_interop_server() as server:
        yield server


@pytest.fixture(scope="module")
def interop_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """One CA for the module's TLS proxy and server (``tls_ca`` is per test)."""
    return TestCA.create(tmp_path_factory.mktemp("interop-ca"), "interop-ca")


@pytest.fixture(scope="module")
def tls_interop_server(interop_ca: TestCA) -> Iterator[InteropServer]:
    # Valid for 127.0.0.1, the host the proxy dials and checks (no --backend-server-name).
    with running_interop_server(interop_ca.issue_server("interop-server")) as server:
        yield server


class Target:
    """Where the client connects (the proxy, or the server itself with INTEROP_DIRECT=1),
    as interop_client flags, and the server behind it."""

    def __init__(
        self,
        client_args: list[str],
        server: InteropServer,
        proxy: subprocess.Popen[bytes] | None,
        transport: str,
    ) -> None:
        self.client_args = client_args
        self.server = server
        self.proxy = proxy
        self.transport = transport

    def describe(self) -> str:
        how = "via proxy" if self.proxy is not None else "direct, no proxy"
        return f"{self.transport}, {how}"

    def proxy_output(self) -> str:
        if self.proxy is None:
            return ""
        state = "running" if self.proxy.poll() is None else f"exited {self.proxy.returncode}"
        return f"--- proxy ({state}) ---\n{_tail(proxy_output(self.proxy))}\n"


def _tcp_args(port: int) -> list[str]:
    return ["--server_host=127.0.0.1", f"--server_port={port}"]


def _tls_client_args(ca: Path, server_name: str) -> list[str]:
    # --ca_file is read only with --use_test_ca; without it the system roots are used.
    return [
        "--use_tls",
        "--use_test_ca",
        f"--ca_file={ca}",
        f"--server_host_override={server_name}",
    ]


@pytest.fixture(scope="module", params=TRANSPORTS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Module-scoped and parametrized: pytest runs every case of one transport, then tears
    its proxy down before the next transport's starts."""
    transport: str = request.param
    if transport == "tls":
        ca: TestCA = request.getfixturevalue("interop_ca")
        server: InteropServer = request.getfixturevalue("tls_interop_server")
    else:
        server = request.getfixturevalue("interop_server")
    if _direct():
        if transport == "unix":
            pytest.skip("interop_server listens on TCP only: no direct run over a Unix socket")
        tls = _tls_client_args(ca.root_pem, "localhost") if transport == "tls" else []
        yield Target([*_tcp_args(server.port), *tls], server, None, transport)
        return
    port = free_port()
    args = ["serve", "--backend", f"127.0.0.1:{server.port}"]
    with contextlib.ExitStack() as stack:
        if transport == "h2c":
            args += ["--listen", f"h2c:127.0.0.1:{port}"]
            client_args = _tcp_args(port)
        elif transport == "tls":
            certs = ca.issue_server("proxy", dns=(PROXY_TLS_NAME,), ips=())
            args += [
                *tls_listen_args(certs, port),
                "--backend-tls",
                "--backend-ca",
                str(ca.root_pem),
            ]
            client_args = [*_tcp_args(port), *_tls_client_args(ca.root_pem, PROXY_TLS_NAME)]
        else:
            path = stack.enter_context(short_socket_path())
            # start_proxy adds a TCP listener after this one and waits for it (see there).
            args += ["--listen", f"unix:{path}"]
            client_args = [f"--server_host=unix://{path}", "--server_port=0"]
        proc, _ = stack.enter_context(start_proxy(args))
        yield Target(client_args, server, proc, transport)


@pytest.mark.parametrize("case", CASES)
def test_interop(case: str, target: Target) -> None:
    client = require_tool("interop_client")
    env = tool_env()
    # The client logs each step at INFO; without this a failure shows only its last line.
    env.setdefault("GRPC_GO_LOG_SEVERITY_LEVEL", "info")
    command = [client, *target.client_args, f"--test_case={case}"]
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
            f"--- interop_server output ---\n{_tail(target.server.output())}\n"
            f"{target.proxy_output()}",
            pytrace=False,
        )
