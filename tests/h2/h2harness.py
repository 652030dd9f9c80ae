"""Byte-level harness for the sans-I/O codec: a hand-driven peer and a back-to-back pair.

Import as ``from h2harness import ...`` (pytest puts ``tests/h2`` on ``sys.path``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hpack import Decoder, Encoder

from proxy.core.h2 import frames as fr
from proxy.core.h2.connection import Connection, Role
from proxy.core.h2.events import DataReceived, Event, HeaderList, SettingsChanged
from proxy.core.h2.limits import Limits

REQUEST: HeaderList = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo.Echo/UnaryEcho"),
    (b":authority", b"proxy.test"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
RESPONSE: HeaderList = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS: HeaderList = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


class FakeClock:
    """A clock that only moves when told to, so rate limits do not depend on machine speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes

    def settings(self) -> dict[int, int]:
        assert self.kind == fr.SETTINGS
        it = range(0, len(self.payload), 6)
        return dict(struct.unpack_from(">HI", self.payload, i) for i in it)

    @property
    def error_code(self) -> int:
        if self.kind == fr.RST_STREAM:
            return int(struct.unpack(">I", self.payload)[0])
        assert self.kind == fr.GOAWAY, self
        return int(struct.unpack_from(">I", self.payload, 4)[0])

    @property
    def increment(self) -> int:
        assert self.kind == fr.WINDOW_UPDATE
        return int(struct.unpack(">I", self.payload)[0])

    @property
    def end_stream(self) -> bool:
        return self.kind in (fr.DATA, fr.HEADERS) and bool(self.flags & fr.FLAG_END_STREAM)


def parse(data: bytes) -> list[Frame]:
    """Split serialized frames; the input must end on a frame boundary."""
    out = []
    pos = 0
    while pos < len(data):
        length, kind, flags, sid = fr.parse_header(data, pos)
        start = pos + fr.FRAME_HEADER_SIZE
        assert start + length <= len(data), "truncated frame"
        out.append(Frame(kind, flags, sid, data[start : start + length]))
        pos = start + length
    return out


def rst(sid: int, code: int) -> Frame:
    return Frame(fr.RST_STREAM, 0, sid, struct.pack(">I", code))


class Peer:
    """The other end of a Connection under test, driven by hand with the frame factory.

    For a SERVER-role connection the peer is a client (it sends the preface); for a CLIENT-role
    connection it is a server. `handshake` exchanges SETTINGS so the connection is ready.
    """

    def __init__(
        self,
        role: Role = Role.SERVER,
        limits: Limits | None = None,
        *,
        settings: dict[int, int] | None = None,
        handshake: bool = True,
    ) -> None:
        self.clock = FakeClock()
        self.conn = Connection(role, limits, self.clock)
        self.encoder = Encoder()
        self.decoder = Decoder()
        first = self.conn.data_to_send()
        if role is Role.CLIENT:
            assert first.startswith(fr.PREFACE)
            first = first[len(fr.PREFACE) :]
        # What the connection announced (SETTINGS, connection WINDOW_UPDATE). A server says
        # nothing until the client's preface has arrived, so it fills this in at the handshake.
        self.initial = parse(first)
        if handshake:
            start = fr.PREFACE if role is Role.SERVER else b""
            self.handshake_events = self.feed(start + fr.settings(settings or {}))
            assert all(isinstance(e, SettingsChanged) for e in self.handshake_events)
            *announced, ack = self.out()
            assert ack == Frame(fr.SETTINGS, fr.FLAG_ACK, 0, b"")
            if role is Role.SERVER:
                assert self.initial == []
                self.initial = announced
            else:
                assert announced == []

    def feed(self, data: bytes) -> list[Event]:
        return self.conn.receive_data(data)

    def out(self) -> list[Frame]:
        return parse(self.conn.data_to_send())

    def block(self, headers: HeaderList) -> bytes:
        return self.encoder.encode(headers)

    def headers(self, sid: int, headers: HeaderList, end_stream: bool = False) -> list[Event]:
        return self.feed(fr.headers(sid, self.block(headers), end_stream))

    def decode(self, frame: Frame) -> HeaderList:
        assert frame.kind == fr.HEADERS and frame.flags & fr.FLAG_END_HEADERS
        return [(bytes(n), bytes(v)) for n, v in self.decoder.decode(frame.payload, raw=True)]


class Pair:
    """A CLIENT and a SERVER Connection wired back to back."""

    def __init__(
        self, client_limits: Limits | None = None, server_limits: Limits | None = None
    ) -> None:
        self.clock = FakeClock()
        self.client = Connection(Role.CLIENT, client_limits, self.clock)
        self.server = Connection(Role.SERVER, server_limits, self.clock)
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.pump()

    def pump(self, auto_ack: bool = True) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until both are quiet; return the new (client, server) events.
        With auto_ack each side acknowledges the DATA it receives, as the relay does."""
        new_client: list[Event] = []
        new_server: list[Event] = []
        for _ in range(1000):
            c2s = self.client.data_to_send()
            s2c = self.server.data_to_send()
            if not c2s and not s2c:
                break
            if c2s:
                got = self.server.receive_data(c2s)
                new_server += got
                if auto_ack:
                    _ack(self.server, got)
            if s2c:
                got = self.client.receive_data(s2c)
                new_client += got
                if auto_ack:
                    _ack(self.client, got)
        else:
            raise AssertionError("the connections never went quiet")
        self.client_events += new_client
        self.server_events += new_server
        return new_client, new_server


def _ack(conn: Connection, events: list[Event]) -> None:
    for ev in events:
        if isinstance(ev, DataReceived) and ev.data:
            conn.ack_data(ev.stream_id, len(ev.data))
