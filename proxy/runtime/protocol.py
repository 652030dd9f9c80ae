"""What the client-facing and backend-facing adapters share: a codec, a transport, batched
writes and transport backpressure."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.core.h2.connection import Connection
from proxy.core.h2.events import DataFlushed, Event

if TYPE_CHECKING:  # flusher imports this module (to call flush natively)
    from proxy.runtime.flusher import Flusher


class H2Protocol(asyncio.Protocol):
    h2: Connection

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.transport: asyncio.Transport | None = None
        self.dirty = False
        self.closed = False
        # A cleartext transport writes a list with one writev: big DATA payloads go out from
        # where they were received, not copied into one buffer first. TLS joins: each item
        # written on its own would become a TLS record of its own (uvloop's SSL transport).
        self.gather = False

    def mark(self) -> None:
        if not self.dirty:  # most marks repeat one made earlier in the same callback
            self.dirty = True
            self.flusher.mark(self)

    def flush(self) -> None:
        self.dirty = False
        if self.closed or self.transport is None:
            return
        h2 = self.h2
        if h2.gathered and self.gather:
            self.transport.writelines(h2.take_output())
            return
        data = h2.data_to_send()
        if data:
            self.transport.write(data)

    def pause_writing(self) -> None:
        # The peer reads slower than we write: stop writing DATA (the codec queues it per
        # stream, and we stop acknowledging the other side, which then stops too).
        self.h2.pause_writing()

    def resume_writing(self) -> None:
        events = self.h2.resume_writing()
        self.on_flushed_events(events)
        self.mark()

    def on_flushed_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, DataFlushed):
                self.data_flushed(ev.stream_id, ev.length)

    def data_flushed(self, stream_id: int, length: int) -> None:
        raise NotImplementedError
