"""A tiny plain HTTP/2 (cleartext, prior knowledge) backend for conformance tests.

It answers ANY request (any method, with or without a body, with or without trailers),
once the request has ended (END_STREAM), with ``:status 200``,
``content-type: text/plain`` and :data:`BODY` (no body for HEAD).  The response body is
sent under HTTP/2 flow control: never more than the peer's stream and connection windows
and max frame size allow, resuming on WINDOW_UPDATE / SETTINGS.  Protocol errors are
detected by the ``h2`` library, which queues the right GOAWAY / RST_STREAM.

Run it standalone::

    python -m tests.conformance.h2_backend --port 8081
    # prints "listening 127.0.0.1:8081"

or in-process with :func:`start_backend` (asyncio) or :func:`running_backend` (a context
manager that serves on a background thread and yields the port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

BODY = b"hello from backend\n"
# How long to wait for the peer to close after we sent GOAWAY and FIN.
LINGER_S = 2.0


class _Response:
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0


class H2BackendProtocol(asyncio.Protocol):
    """One HTTP/2 server connection."""

    def __init__(self, registry: set[H2BackendProtocol] | None = None) -> None:
        self.registry = registry
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        # stream id -> HEAD request?
        self.requests: dict[int, bool] = {}
        # stream id -> response body still to send (headers already sent)
        self.pending: dict[int, _Response] = {}
        self.closed = False

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        if self.registry is not None:
            self.registry.add(self)
        self.conn.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.requests.clear()
        if self.registry is not None:
            self.registry.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 has already queued a GOAWAY with the right error code.
            self._flush()
            self._close()
            return
        for event in events:
            self._handle(event)
            if self.closed:
                return
        self._flush()

    # ------------------------------------------------------------ events
    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            method = b""
            for name, value in event.headers or []:
                if name in (b":method", ":method"):
                    method = value.encode() if isinstance(value, str) else value
            self.requests[event.stream_id] = method == b"HEAD"
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            # Give the window back straight away, so a client may send any amount.
            if event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self._respond(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self.requests.pop(event.stream_id, None)
            self.pending.pop(event.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._send_pending()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The peer sent GOAWAY.  It may still expect answers (a PING, streams below
            # last_stream_id), so keep the connection open until the peer closes it.
            pass

    def _respond(self, stream_id: int) -> None:
        is_head = self.requests.pop(stream_id, False)
        headers = [
            (b":status", b"200"),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(BODY)).encode()),
        ]
        try:
            if is_head:
                self.conn.send_headers(stream_id, headers, end_stream=True)
                return
            self.conn.send_headers(stream_id, headers)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.pending[stream_id] = _Response(BODY)
        self._send_pending()

    def _send_pending(self) -> None:
        """Send as much pending body as the flow-control windows allow."""
        for stream_id in list(self.pending):
            response = self.pending[stream_id]
            try:
                while response.offset < len(response.data):
                    window = self.conn.local_flow_control_window(stream_id)
                    size = min(
                        window,
                        self.conn.max_outbound_frame_size,
                        len(response.data) - response.offset,
                    )
                    if size <= 0:
                        break  # wait for WINDOW_UPDATE / SETTINGS
                    chunk = response.data[response.offset : response.offset + size]
                    response.offset += size
                    self.conn.send_data(
                        stream_id, chunk, end_stream=response.offset == len(response.data)
                    )
                if response.offset >= len(response.data):
                    del self.pending[stream_id]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.pending.pop(stream_id, None)

    # ------------------------------------------------------------ I/O
    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        """Close after a connection error, without losing the queued GOAWAY.

        Closing a socket that still has unread input makes the kernel send RST, and the
        peer may then never read the GOAWAY.  So: send FIN after the GOAWAY, discard
        whatever else arrives, and close when the peer closes (or after a grace period).
        """
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def eof_received(self) -> bool | None:
        return False  # the peer is done: close our side too


async def start_backend(
    host: str = "127.0.0.1", port: int = 0, connections: set[H2BackendProtocol] | None = None
) -> asyncio.Server:
    """Start serving on the running loop; the bound port is :func:`server_port`.

    If ``connections`` is given, every open connection's protocol is kept in it.
    """
    loop = asyncio.get_running_loop()

    def factory() -> H2BackendProtocol:
        protocol = H2BackendProtocol(connections)
        return protocol

    return await loop.create_server(factory, host, port)


def server_port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


@contextlib.contextmanager
def running_backend(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Serve on a background thread with its own event loop; yields the bound port."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None
    errors: list[BaseException] = []
    ports: list[int] = []

    connections: set[H2BackendProtocol] = set()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            server = await start_backend(host, port, connections)
        except BaseException as exc:
            errors.append(exc)
            started.set()
            return
        ports.append(server_port(server))
        started.set()
        try:
            await stop.wait()
        finally:
            server.close()
            # Abort the connections still open, so that wait_closed() returns.
            for protocol in list(connections):
                if protocol.transport is not None:
                    protocol.transport.abort()
            # Let the aborted transports run connection_lost (which closes their sockets).
            for _ in range(3):
                await asyncio.sleep(0)
            await server.wait_closed()

    def run() -> None:
        try:
            loop.run_until_complete(main())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="h2-backend", daemon=True)
    thread.start()
    started.wait(10)
    if errors:
        thread.join(5)
        raise RuntimeError(f"h2 backend failed to start: {errors[0]!r}")
    if not ports:
        raise RuntimeError("h2 backend did not start within 10s")
    try:
        yield ports[0]
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


async def _serve_forever(host: str, port: int) -> None:
    server = await start_backend(host, port)
    print(f"listening {host}:{server_port(server)}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
