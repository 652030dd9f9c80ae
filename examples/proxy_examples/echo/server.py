"""Echo backend: a gRPC server whose behaviour is driven by request metadata.

Every call gets initial metadata ``x-backend: <name>`` and every response carries
``backend=<name>``. Request metadata understood by every method:

``x-echo-status: <int>``
    Abort with this status code (1..16; 0 means no abort) and details
    ``x-echo-message`` (default ``"echo status <code>"``). Trailers carry
    ``grpc-status-details-bin``: a ``google.rpc.Status`` (see :func:`status_details`).
    Without ``x-echo-fail-after`` the abort happens at the start of the call.
``x-echo-fail-after: <n>``
    Abort after ``n`` messages: responses sent (server and bidi streaming) or requests
    received (client streaming); 0 also works for unary. The code is ``x-echo-status``
    if given, else INTERNAL.
``x-echo-delay-ms: <n>``
    Sleep before doing anything else (ends early if the call is cancelled).
``x-echo-interval-ms: <n>``
    ServerStreamingEcho: sleep between responses.
``x-echo-meta-*``
    Echoed byte-exact in both initial and trailing metadata (``-bin`` keys too).

ClientStreamingEcho answers with the concatenated messages, an empty payload and the
total number of payload bytes received in trailer ``x-echo-payload-bytes``.

Served over TLS (``serve(..., tls_cert=, tls_key=)``, ``--tls-cert``/``--tls-key``), and with
a client CA (``tls_client_ca``, ``--tls-client-ca``) requiring a client certificate, the
initial metadata also names the verified client: ``x-peer-cn`` (subject CN) and one
``x-peer-uri`` / ``x-peer-dns`` per URI / DNS SAN, so tests see which identity called
(the proxy's own certificate, when it relays to a TLS backend).

The server also serves ``grpc.health.v1.Health`` (SERVING for ``""`` and ``echo.Echo``);
:meth:`EchoServer.set_health` flips it, and so do SIGUSR1 (NOT_SERVING) and SIGUSR2 (SERVING)
sent to ``python -m proxy_examples.echo.server``.

Calls that end cancelled (client cancel, deadline, connection loss) are counted in
:attr:`EchoServicer.cancelled_calls` and logged as ``cancelled <method>`` so that tests
driving a subprocess backend can observe them on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proxy_examples.echo import echo_pb2, echo_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "echo.Echo"
META_PREFIX = "x-echo-meta-"
# Lets a test push a 64 MiB payload through without tuning the client side of the backend.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # grpc enables SO_REUSEPORT by default, which would let two backends silently share
    # a port picked by a racing test; we want the second bind to fail instead.
    ("grpc.so_reuseport", 0),
]

Metadata = list[tuple[str, str | bytes]]
StrPath = str | os.PathLike[str]
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def status_details(code: int, message: str, backend: str) -> bytes:
    """Serialize the ``google.rpc.Status`` the backend sends as ``grpc-status-details-bin``.

    It holds ``code``, ``message`` and one detail: a ``google.protobuf.Any`` packing an
    ``echo.EchoResponse`` whose ``backend`` names the server. Encoded by hand because
    googleapis-common-protos is not a dependency.
    """
    detail = echo_pb2.EchoResponse(backend=backend).SerializeToString()
    any_msg = _len_field(1, b"type.googleapis.com/echo.EchoResponse") + _len_field(2, detail)
    code_field = _varint(1 << 3) + _varint(code) if code else b""
    return code_field + _len_field(2, message.encode()) + _len_field(3, any_msg)


def _peer_metadata(context: grpc.ServicerContext) -> Metadata:
    """``x-peer-*`` for the verified client certificate of a TLS call (none without one).

    grpcio's auth context has the subject CN, but its SAN list does not say which SAN is a
    URI and which a DNS name; the PEM certificate it also carries does, so read that.
    """
    auth = context.auth_context()
    out: Metadata = [("x-peer-cn", cn.decode()) for cn in auth.get("x509_common_name", ())]
    for pem in auth.get("x509_pem_cert", ())[:1]:
        # Imported here: only TLS backends need it, and cryptography is a dev dependency
        # (the echo backend only runs under tests and load tests).
        from cryptography import x509

        try:
            sans = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
        except x509.ExtensionNotFound:
            break
        names = sans.value
        out += [
            ("x-peer-uri", u) for u in names.get_values_for_type(x509.UniformResourceIdentifier)
        ]
        out += [("x-peer-dns", d) for d in names.get_values_for_type(x509.DNSName)]
    return out


class _Call:
    """Per-call state: parsed metadata plus the hooks that detect cancellation."""

    def __init__(self, servicer: EchoServicer, context: grpc.ServicerContext, method: str):
        self.servicer = servicer
        self.context = context
        self.method = method
        raw: Metadata = list(context.invocation_metadata() or ())
        self.echoed: Metadata = [(k, v) for k, v in raw if k.startswith(META_PREFIX)]
        self.headers = {k: v for k, v in raw if isinstance(v, str)}
        self.fail_after = self.int_header("x-echo-fail-after", -1)
        self.ended = threading.Event()
        # Set once the handler has decided how the call ends; a termination callback
        # that runs before that means the call was cancelled under us.
        self.finished = False
        servicer._call_started()
        if not context.add_callback(self._on_done):
            self._on_done()  # already terminated (cancelled before we got here)
        peer = _peer_metadata(context) if servicer.tls else []
        context.send_initial_metadata([("x-backend", servicer.name), *peer, *self.echoed])
        context.set_trailing_metadata(self.echoed)

    def int_header(self, key: str, default: int) -> int:
        value = self.headers.get(key)
        return default if value is None else int(value)

    def _on_done(self) -> None:
        self.ended.set()
        if not self.finished:
            self.servicer._call_cancelled(self.method)

    def sleep_ms(self, ms: int) -> bool:
        """Sleep unless the call ends first; returns False if it ended (caller bails out)."""
        return ms <= 0 or not self.ended.wait(ms / 1000)

    def start(self) -> bool:
        """Apply the delay and the immediate status; False means the call is gone."""
        if not self.sleep_ms(self.int_header("x-echo-delay-ms", 0)):
            return False
        if self.fail_after < 0 and self.int_header("x-echo-status", 0):
            self.abort()
        self.check_fail(0)
        return True

    def check_fail(self, messages: int) -> None:
        """Abort if ``x-echo-fail-after`` says the call dies after ``messages`` messages."""
        if messages == self.fail_after:
            self.abort(grpc.StatusCode.INTERNAL, f"failed after {messages} messages")

    def abort(
        self, default: grpc.StatusCode = grpc.StatusCode.UNKNOWN, message: str = ""
    ) -> NoReturn:
        status = self.int_header("x-echo-status", 0)
        code = _CODES[status] if status else default
        text = self.headers.get("x-echo-message") or message or f"echo status {code.value[0]}"
        details = status_details(code.value[0], text, self.servicer.name)
        self.context.set_trailing_metadata([*self.echoed, ("grpc-status-details-bin", details)])
        self.finished = True
        self.context.abort(code, text)
        raise AssertionError("unreachable: context.abort raises")  # grpc is untyped

    def reply(self, message: str, payload: bytes) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message=message, payload=payload, backend=self.servicer.name)

    def done(self) -> None:
        self.finished = True


class EchoServicer(echo_pb2_grpc.EchoServicer):  # type: ignore[misc]  # generated base is untyped
    """Implements ``echo.Echo``; thread-safe, one instance per server."""

    def __init__(self, name: str, tls: bool = False) -> None:
        self.name = name
        # Only a TLS server has peer certificates to report; the cleartext path stays as it was.
        self.tls = tls
        self._cond = threading.Condition()
        self._calls = 0
        self._cancelled = 0

    @property
    def calls(self) -> int:
        """Number of calls that reached a handler."""
        with self._cond:
            return self._calls

    @property
    def cancelled_calls(self) -> int:
        """Number of calls that ended cancelled before the handler finished them."""
        with self._cond:
            return self._cancelled

    def wait_for_cancelled(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least ``count`` calls ended cancelled; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._cancelled >= count, timeout)

    def _call_started(self) -> None:
        with self._cond:
            self._calls += 1

    def _call_cancelled(self, method: str) -> None:
        with self._cond:
            self._cancelled += 1
            self._cond.notify_all()
        log.info("cancelled %s backend=%s", method, self.name)

    def UnaryEcho(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> echo_pb2.EchoResponse:
        call = _Call(self, context, "/echo.Echo/UnaryEcho")
        if not call.start():
            return echo_pb2.EchoResponse()
        call.done()
        return call.reply(request.message, request.payload)

    def ServerStreamingEcho(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> Iterator[echo_pb2.EchoResponse]:
        call = _Call(self, context, "/echo.Echo/ServerStreamingEcho")
        if not call.start():
            return
        interval = call.int_header("x-echo-interval-ms", 0)
        for sent in range(max(request.count, 1)):
            if sent and not call.sleep_ms(interval):
                return
            yield call.reply(request.message, request.payload)
            call.check_fail(sent + 1)
        call.done()

    def ClientStreamingEcho(
        self, request_iterator: Iterable[echo_pb2.EchoRequest], context: grpc.ServicerContext
    ) -> echo_pb2.EchoResponse:
        call = _Call(self, context, "/echo.Echo/ClientStreamingEcho")
        if not call.start():
            return echo_pb2.EchoResponse()
        messages: list[str] = []
        payload_bytes = 0
        for request in request_iterator:
            messages.append(request.message)
            payload_bytes += len(request.payload)
            call.check_fail(len(messages))
        context.set_trailing_metadata([*call.echoed, ("x-echo-payload-bytes", str(payload_bytes))])
        call.done()
        return call.reply("".join(messages), b"")

    def BidirectionalStreamingEcho(
        self, request_iterator: Iterable[echo_pb2.EchoRequest], context: grpc.ServicerContext
    ) -> Iterator[echo_pb2.EchoResponse]:
        call = _Call(self, context, "/echo.Echo/BidirectionalStreamingEcho")
        if not call.start():
            return
        for sent, request in enumerate(request_iterator, start=1):
            yield call.reply(request.message, request.payload)
            call.check_fail(sent)
        call.done()


class EchoServer(grpc.Server):  # type: ignore[misc]  # grpc is untyped
    """A started ``grpc.Server`` running an :class:`EchoServicer`, plus its address.

    Delegates the ``grpc.Server`` API to the real server so callers can treat it as one.
    """

    def __init__(
        self,
        server: grpc.Server,
        servicer: EchoServicer,
        host: str,
        port: int,
        health_servicer: health.HealthServicer,
    ):
        self.server = server
        self.servicer = servicer
        self.host = host
        self.port = port
        # grpc.health.v1 state: tests flip it with set_health() or .health.set(service, status).
        self.health = health_servicer

    @property
    def name(self) -> str:
        """The name reported in ``x-backend`` and ``EchoResponse.backend``."""
        return self.servicer.name

    @property
    def address(self) -> str:
        """``host:port`` to dial (IPv6 hosts bracketed)."""
        return f"{_bracket(self.host)}:{self.port}"

    @property
    def cancelled_calls(self) -> int:
        """See :attr:`EchoServicer.cancelled_calls`."""
        return self.servicer.cancelled_calls

    def wait_for_cancelled(self, count: int = 1, timeout: float = 5.0) -> bool:
        """See :meth:`EchoServicer.wait_for_cancelled`."""
        return self.servicer.wait_for_cancelled(count, timeout)

    def set_health(self, serving: bool, service: str = "") -> None:
        """Answer ``grpc.health.v1.Health/Check`` for ``service`` with SERVING or NOT_SERVING.

        ``""`` is the server's overall health; :data:`SERVICE_NAME` is also registered.
        """
        response = health_pb2.HealthCheckResponse
        self.health.set(service, response.SERVING if serving else response.NOT_SERVING)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self.server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return int(self.server.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        return int(self.server.add_secure_port(address, server_credentials))

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float | None) -> threading.Event:
        event: threading.Event = self.server.stop(grace)
        return event

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout))


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class MethodSymbolPool:
    """The descriptor pool for grpcio's reflection, which also finds methods.

    ghz and grpcurl resolve a call by asking reflection for the file of `pkg.Service.Method`;
    grpcio's reflection asks the pool, and protobuf's (upb) pool only knows messages, enums,
    services and the like, so they get "Symbol not found" (grpc/grpc#34743, bojand/ghz#419).
    A method's file is its service's.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            found: FileDescriptor = self._pool.FindFileContainingSymbol(symbol)
            return found
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            if not service_name:
                raise
            service = self._pool.FindServiceByName(service_name)  # KeyError: not found either
            if method not in service.methods_by_name:
                raise
            file: FileDescriptor = service.file
            return file


def tls_server_credentials(
    cert: StrPath, key: StrPath, client_ca: StrPath | None = None
) -> grpc.ServerCredentials:
    """Server credentials from PEM files; ``client_ca`` requires a client certificate it signed.

    ``cert`` may hold a chain (leaf first). The files are read once: grpcio keeps the bytes.
    """
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def serve(
    port: int,
    host: str = "127.0.0.1",
    name: str | None = None,
    max_workers: int = 64,
    *,
    tls_cert: StrPath | None = None,
    tls_key: StrPath | None = None,
    tls_client_ca: StrPath | None = None,
) -> tuple[EchoServer, int]:
    """Start an echo backend on ``host:port`` (0 picks a free port) and return it with its port.

    ``name`` defaults to ``host:port``. Each in-flight call holds one of ``max_workers``
    threads (streams included), so raise it for load tests with many open streams.
    ``tls_cert`` and ``tls_key`` (PEM files, together) serve TLS instead of cleartext h2c;
    ``tls_client_ca`` then requires client certificates signed by it (mutual TLS) and
    reports the caller's identity in ``x-peer-*`` metadata. Stop it with ``server.stop(grace)``.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise ValueError("tls_client_ca needs tls_cert and tls_key")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="echo"),
        options=SERVER_OPTIONS,
    )
    address = f"{_bracket(host)}:{port}"
    if tls_cert is not None and tls_key is not None:
        credentials = tls_server_credentials(tls_cert, tls_key, tls_client_ca)
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"echo backend could not bind {host}:{port}")
    servicer = EchoServicer(name or f"{_bracket(host)}:{bound}", tls=tls_cert is not None)
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)

    health_servicer = health.HealthServicer()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
        pool=MethodSymbolPool(descriptor_pool.Default()),
    )

    server.start()
    return EchoServer(server, servicer, host, bound, health_servicer), bound


def main(argv: list[str] | None = None) -> None:
    """``python -m proxy_examples.echo.server --port N [--host H] [--name NAME] [--workers W]
    [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]``."""
    parser = argparse.ArgumentParser(description="Echo gRPC backend for proxy tests")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default=None, help="backend name (default host:port)")
    parser.add_argument("--workers", type=int, default=64, help="max concurrent calls")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA"
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    # stderr carries the "cancelled ..." lines that subprocess tests look for.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server, port = serve(
        args.port,
        args.host,
        args.name,
        args.workers,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )

    def on_health_signal(signum: int, frame: FrameType | None) -> None:
        serving = signum == signal.SIGUSR2
        for service in ("", SERVICE_NAME):
            server.set_health(serving, service)
        log.info("health %s backend=%s", "SERVING" if serving else "NOT_SERVING", server.name)

    signal.signal(signal.SIGUSR1, on_health_signal)
    signal.signal(signal.SIGUSR2, on_health_signal)
    # Printed only once the server accepts calls: launchers wait for this line.
    print(f"listening {_bracket(args.host)}:{port}", flush=True)
    stop.wait()
    server.stop(grace=1.0).wait()


if __name__ == "__main__":
    main()
