"""The backend-facing side: one pooled HTTP/2 connection to one backend, shared by many calls.

States: CONNECTING (calls wait in `waiting`), HANDSHAKE (connected, waiting for the backend's
SETTINGS: until then its stream limit is unknown, and streams above it would be refused),
READY (new streams open at once), DRAINING (the backend sent GOAWAY: streams it accepted
finish, new calls go to another connection), CLOSED.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import TYPE_CHECKING

import structlog

from proxy.core.call import DONE
from proxy.core.h2.connection import Connection, Role
from proxy.core.h2.errors import ErrorCode, H2ConnectionError, error_code_name
from proxy.core.h2.events import (
    DataFlushed,
    DataReceived,
    GoAwayReceived,
    HeadersReceived,
    SettingsChanged,
    StreamReset,
)
from proxy.core.h2.limits import Limits
from proxy.core.waiting import WaitQueue
from proxy.runtime.flusher import Flusher
from proxy.runtime.protocol import H2Protocol

if TYPE_CHECKING:
    from proxy.core.buffers import BufferMeter
    from proxy.core.call import Call
    from proxy.core.ports import ConnectionOwner

log = structlog.get_logger("proxy.upstream")


class State(Enum):
    CONNECTING = 1
    HANDSHAKE = 2
    READY = 3
    DRAINING = 4
    CLOSED = 5


class BackendConnection(H2Protocol):
    def __init__(
        self,
        owner: ConnectionOwner[BackendConnection],
        flusher: Flusher,
        limits: Limits,
        meter: BufferMeter | None = None,
    ) -> None:
        super().__init__(flusher)
        self.owner = owner
        self.limits = limits
        self.state = State.CONNECTING
        self.calls: dict[int, Call] = {}
        self.waiting = WaitQueue()  # calls waiting for the handshake
        # Request bytes waiting for the backend's windows count in the process's budget.
        self.h2 = Connection(Role.CLIENT, limits, meter=meter)
        self._handshake_timer: asyncio.TimerHandle | None = None

    @property
    def is_pending(self) -> bool:
        """Not ready yet, but calls may wait for it."""
        return self.state is State.CONNECTING or self.state is State.HANDSHAKE

    @property
    def has_capacity(self) -> bool:
        return self.state is State.READY and self.h2.can_open_stream

    # ------------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.gather = transport.get_extra_info("ssl_object") is None
        self.state = State.HANDSHAKE
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.owner.connect_timeout_s, self._handshake_timed_out
        )
        self.mark()  # our preface and SETTINGS

    def _handshake_done(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.state = State.READY
        waiting = self.waiting.take_all()
        if waiting and self.h2.goaway_received is not None:
            # Turned away before serving anything: as good as a failed connect.
            self.owner.backend_failed()
        for call in waiting:
            if call.phase == DONE:
                continue
            if self.h2.can_open_stream:
                self.open(call)
            elif self.h2.goaway_received is not None:
                call.retry_or_fail("GOAWAY before the call could start", "goaway")
            else:
                self.owner.attach(call)  # over the backend's limit: another connection

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state is State.HANDSHAKE:
            log.warning("backend_handshake_timeout", backend=self.owner.address)
            self.owner.connection_closed(self)
            self.owner.backend_failed()
            self.connect_failed(
                "no SETTINGS from the backend (not an HTTP/2 server?)", "handshake_timeout"
            )
            if self.transport is not None:
                self.transport.close()

    def connect_failed(self, reason: str, kind: str) -> None:
        self.state = State.CLOSED
        self.closed = True
        for call in self.waiting.take_all():
            call.retry_or_fail(reason, kind)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.state is not State.CLOSED
        in_handshake = self.state is State.HANDSHAKE
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.state = State.CLOSED
        self.closed = True
        self.owner.connection_closed(self)
        if not was_open:
            return
        if in_handshake or self.calls or self.waiting:
            # Once per connection, not per call: a lost connection is one event. A connection
            # that goes idle and closes (a backend's max age, our own close) is no failure.
            self.owner.backend_failed()
        reason = f"connection lost ({exc})" if exc else "closed the connection"
        for call in self.waiting.take_all():  # never sent: safe to try elsewhere
            call.retry_or_fail(reason, "closed_before_start")
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.on_upstream_lost(reason)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()

    # ------------------------------------------------------------------ streams

    def open(self, call: Call) -> None:
        end_stream = call.request_ended and not call.unsent and call.request_trailers is None
        sid = self.h2.open_stream(call.headers, end_stream)
        self.calls[sid] = call
        call.on_stream_opened(self, sid)
        self.mark()

    def cancel(self, call: Call) -> None:
        """The call is over on the client side: reset its backend stream if still open."""
        sid = call.bsid
        if self.calls.pop(sid, None) is not None:
            self.h2.reset_stream(sid, ErrorCode.CANCEL)
            self.mark()
            self.owner.stream_finished(self)

    def _end_stream(self, sid: int) -> None:
        try:  # noqa: SIM105 (compiled, pop(sid, None) and suppress are Python calls)
            del self.calls[sid]
        except KeyError:
            pass
        if self.h2.is_open(sid):
            # The response ended before the request: the rest of the request is unwanted.
            self.h2.reset_stream(sid, ErrorCode.CANCEL)
        self.owner.stream_finished(self)

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2ConnectionError as exc:
            log.warning(
                "backend_protocol_error",
                backend=self.owner.address,
                code=exc.code.name,
                reason=exc.message,
            )
            if self.transport is not None:
                self.transport.write(self.h2.close_with_error(exc))
                self.transport.close()
            self.closed = True
            return
        calls = self.calls
        for ev in events:
            if isinstance(ev, DataReceived):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call.on_response_data(ev.data, ev.end_stream)
                    if ev.end_stream:
                        self._end_stream(ev.stream_id)
                elif ev.data:
                    self.h2.ack_data(ev.stream_id, len(ev.data))
            elif isinstance(ev, HeadersReceived):
                call = calls.get(ev.stream_id)
                if call is None:
                    continue
                if ev.is_trailers:
                    call.on_response_trailers(ev.headers)
                else:
                    call.on_response_headers(ev.headers, ev.end_stream)
                if ev.end_stream:
                    self._end_stream(ev.stream_id)
            elif isinstance(ev, DataFlushed):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call.on_upstream_flushed(ev.length)
            elif isinstance(ev, StreamReset):
                call = calls.pop(ev.stream_id, None)
                if call is not None:
                    self.owner.stream_finished(self)
                    call.on_backend_reset(ev.error_code, ev.remote)
            elif isinstance(ev, GoAwayReceived):
                self._receive_goaway(ev.last_stream_id, ev.error_code)
            elif isinstance(ev, SettingsChanged):
                if self.state is State.HANDSHAKE:
                    self._handshake_done()
                else:
                    self.owner.capacity_changed(self)
        self.mark()

    def _receive_goaway(self, last_stream_id: int, code: int) -> None:
        log.info(
            "backend_goaway",
            backend=self.owner.address,
            last_stream_id=last_stream_id,
            code=error_code_name(code),
        )
        self.state = State.DRAINING
        self.owner.connection_draining(self)
        # Streams above the last id never reached the application: replay them elsewhere.
        refused = [s for s in self.calls if s > last_stream_id]
        if refused:
            # A backend draining gracefully refuses nothing; one that drops work it was
            # sent counts as one failure (per GOAWAY, not per call).
            self.owner.backend_failed()
        for sid in refused:
            call = self.calls.pop(sid)
            self.h2.reset_stream(sid, ErrorCode.CANCEL)
            call.retry_or_fail(
                f"GOAWAY ({error_code_name(code)}) above stream {last_stream_id}", "goaway"
            )
        if not self.calls:
            self.close()

    def data_flushed(self, stream_id: int, length: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.on_upstream_flushed(length)
