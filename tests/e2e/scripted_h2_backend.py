"""A plain HTTP/2 backend (``h2`` library) that misbehaves on purpose, for relay tests.

Each instance serves one :class:`Behaviour` on every connection:

``REFUSE``
    Answer every request stream with ``RST_STREAM(REFUSED_STREAM)`` before any response:
    the request reached no application code, so the proxy may replay it elsewhere.
``GOAWAY_ON_CONNECT``
    Send SETTINGS then ``GOAWAY(last_stream_id=0, NO_ERROR)`` as soon as a connection is
    accepted, and ignore everything the peer sends (no stream is ever processed).
``HEADERS_THEN_RESET``
    Answer a request with response HEADERS (``:status 200``, ``content-type:
    application/grpc``, ``x-scripted: headers-then-reset``) and then ``RST_STREAM`` with the
    code given in the request header ``x-reset-code`` (decimal; default INTERNAL_ERROR).

:func:`running_scripted_backend` serves on a background thread with its own event loop and
yields a :class:`ScriptedBackend` (``.port``, ``.connections``, ``.requests``).

Named ``scripted_h2_backend`` (not ``h2_backend``): ``tests/conformance/h2_backend.py`` is
importable under that name too, and both directories are on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Iterator
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

RESET_CODE_HEADER = b"x-reset-code"


class Behaviour(enum.Enum):
    REFUSE = "refuse"
    GOAWAY_ON_CONNECT = "goaway-on-connect"
    HEADERS_THEN_RESET = "headers-then-reset"


class ScriptedBackend:
    """What the tests see of a running backend: its port and what it has been asked."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.port = 0
        self._lock = threading.Lock()
        self._connections = 0
        self._requests = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def requests(self) -> int:
        """Request HEADERS received so far (always 0 for GOAWAY_ON_CONNECT)."""
        with self._lock:
            return self._requests

    def _count(self, connections: int = 0, requests: int = 0) -> None:
        with self._lock:
            self._connections += connections
            self._requests += requests


class _Protocol(asyncio.Protocol):
    def __init__(self, backend: ScriptedBackend, registry: set[_Protocol]) -> None:
        self.backend = backend
        self.registry = registry
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.deaf = False  # after our GOAWAY: read and drop everything

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.registry.add(self)
        self.backend._count(connections=1)
        self.conn.initiate_connection()
        if self.backend.behaviour is Behaviour.GOAWAY_ON_CONNECT:
            self.conn.close_connection(error_code=0, last_stream_id=0)
            self.deaf = True
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)

    def eof_received(self) -> bool | None:
        return False  # the peer is done: close our side too

    def data_received(self, data: bytes) -> None:
        if self.deaf:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2 queued the GOAWAY
            self.deaf = True
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            self.backend._count(requests=1)
            self._answer(event.stream_id, dict(event.headers or []))
        elif (
            isinstance(event, h2.events.DataReceived)
            and event.flow_controlled_length
            and event.stream_id is not None
        ):
            # Hand the connection window back, so later streams are never starved.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _answer(self, stream_id: int, headers: dict[bytes, bytes]) -> None:
        behaviour = self.backend.behaviour
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            if behaviour is Behaviour.REFUSE:
                self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            elif behaviour is Behaviour.HEADERS_THEN_RESET:
                code = int(headers.get(RESET_CODE_HEADER, b"2"))
                self.conn.send_headers(
                    stream_id,
                    [
                        (b":status", b"200"),
                        (b"content-type", b"application/grpc"),
                        (b"x-scripted", b"headers-then-reset"),
                    ],
                )
                self.conn.reset_stream(stream_id, code)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


@contextlib.contextmanager
def running_scripted_backend(behaviour: Behaviour) -> Iterator[ScriptedBackend]:
    """Serve ``behaviour`` on 127.0.0.1 (free port) from a background thread."""
    backend = ScriptedBackend(behaviour)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []
    stop: asyncio.Event | None = None
    connections: set[_Protocol] = set()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            server = await loop.create_server(
                lambda: _Protocol(backend, connections), "127.0.0.1", 0
            )
        except BaseException as exc:
            errors.append(exc)
            started.set()
            return
        backend.port = server.sockets[0].getsockname()[1]
        started.set()
        try:
            await stop.wait()
        finally:
            server.close()
            for protocol in list(connections):
                if protocol.transport is not None:
                    protocol.transport.abort()
            for _ in range(3):  # let the aborted transports run connection_lost
                await asyncio.sleep(0)
            await server.wait_closed()

    def run() -> None:
        try:
            loop.run_until_complete(main())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"scripted-h2-{behaviour.value}", daemon=True)
    thread.start()
    started.wait(10)
    if errors or not backend.port:
        thread.join(5)
        raise RuntimeError(f"scripted h2 backend failed to start: {errors!r}")
    try:
        yield backend
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
