"""Backends that fail on demand, and reading the proxy's JSON log, for the outcome tests.

Import as ``from outcomes_support import ...`` (pytest puts ``tests/outcomes`` on ``sys.path``).
"""

from __future__ import annotations

import socket
import threading
from concurrent import futures

import grpc

from proxy_examples.echo import echo_pb2, echo_pb2_grpc
from proxy_examples.echo.server import SERVER_OPTIONS, EchoServicer


class FlakyServicer(EchoServicer):
    """The echo service, which answers UnaryEcho with UNAVAILABLE while `failing` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.failing = False
        self._lock = threading.Lock()
        self._received = 0

    @property
    def received(self) -> int:
        """UnaryEcho calls that reached this backend, failed or not."""
        with self._lock:
            return self._received

    def UnaryEcho(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> echo_pb2.EchoResponse:
        with self._lock:
            self._received += 1
        if self.failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is failing")
        return super().UnaryEcho(request, context)


class FlakyBackend:
    def __init__(self, name: str) -> None:
        self.servicer = FlakyServicer(name)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS
        )
        echo_pb2_grpc.add_EchoServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def name(self) -> str:
        return self.servicer.name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def received(self) -> int:
        return self.servicer.received

    def fail(self, failing: bool = True) -> None:
        self.servicer.failing = failing

    def stop(self) -> None:
        self.server.stop(None).wait()


class ClosingListener:
    """Accepts TCP connections and closes them at once, before any HTTP/2: every call sent
    there reaches no backend code (the proxy sees the connection lost in its handshake)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


def proxy_args(*backends: str, options: tuple[str, ...] = ()) -> list[str]:
    """`serve` with these static backends, JSON logs, no admin port (tests run in parallel),
    no access log unless `options` turn it on."""
    args = ["serve", "--admin", "off", "--log-format", "json", "--access-log-sample", "0"]
    for address in backends:
        args += ["--backend", address]
    return [*args, *options]
