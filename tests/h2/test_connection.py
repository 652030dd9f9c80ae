"""Byte-level tests of the sans-I/O connection (proxy/core/h2/connection.py).

Frames come from the codec's own frame factory (proxy/core/h2/frames.py) and hpack; the codec's
output is parsed back into frames. `Peer` drives one Connection by hand, `Pair` wires a CLIENT
and a SERVER back to back, and the `h2` library serves as an independent peer for interop.
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import pytest
from h2harness import (
    REQUEST,
    RESPONSE,
    TRAILERS,
    Frame,
    Pair,
    Peer,
    parse,
    rst,
)

from proxy.core.h2 import frames as fr
from proxy.core.h2 import validation
from proxy.core.h2.connection import _RECENTLY_CLOSED_MAX, Connection, Role
from proxy.core.h2.errors import ErrorCode, FloodError, H2ConnectionError, Http1RequestError
from proxy.core.h2.events import (
    DataFlushed,
    DataReceived,
    Event,
    GoAwayReceived,
    HeadersReceived,
    PingAcked,
    SettingsChanged,
    StreamReset,
)
from proxy.core.h2.limits import Limits
from proxy.core.units import KiB, MiB

U32 = struct.Struct(">I")
OPAQUE = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def conn_error(peer: Peer, data: bytes) -> H2ConnectionError:
    """Feed data, expect a connection error, and check the GOAWAY that reports it."""
    with pytest.raises(H2ConnectionError) as info:
        peer.feed(data)
    exc = info.value
    *_, goaway = parse(peer.conn.close_with_error(exc))
    assert goaway.kind == fr.GOAWAY
    assert goaway.error_code == exc.code
    assert goaway.payload[8:] == exc.message.encode()[:256]
    return exc


def open_request(peer: Peer, sid: int = 1, end_stream: bool = False) -> None:
    events = peer.headers(sid, REQUEST, end_stream)
    assert events == [HeadersReceived(sid, REQUEST, end_stream, False)]


def respond(peer: Peer, sid: int = 1) -> None:
    """Server side: send response headers (not ending the stream)."""
    peer.conn.send_headers(sid, RESPONSE, False)
    frames = peer.out()
    assert [f.kind for f in frames] == [fr.HEADERS]
    assert peer.decode(frames[0]) == RESPONSE


def kinds(frames: list[Frame]) -> list[int]:
    return [f.kind for f in frames]


# ---------------------------------------------------------------------------- preface


def test_server_says_nothing_before_the_preface() -> None:
    peer = Peer(handshake=False)
    assert peer.initial == []
    assert peer.feed(fr.PREFACE[:10]) == []
    assert peer.out() == []


def test_server_announces_its_settings_and_connection_window() -> None:
    peer = Peer(handshake=False)
    assert peer.feed(fr.PREFACE) == []
    settings, window_update = peer.out()
    assert settings.kind == fr.SETTINGS and settings.flags == 0
    assert settings.settings() == {
        fr.SETTINGS_MAX_CONCURRENT_STREAMS: 256,
        fr.SETTINGS_INITIAL_WINDOW_SIZE: 256 * KiB,
        fr.SETTINGS_MAX_HEADER_LIST_SIZE: 64 * KiB,
    }
    assert window_update == Frame(fr.WINDOW_UPDATE, 0, 0, U32.pack(4 * MiB - 65_535))


def test_client_sends_the_preface_and_disables_push() -> None:
    peer = Peer(Role.CLIENT, Limits(max_concurrent_streams=7), handshake=False)
    (settings, _) = peer.initial
    assert settings.settings()[fr.SETTINGS_ENABLE_PUSH] == 0
    assert settings.settings()[fr.SETTINGS_MAX_CONCURRENT_STREAMS] == 7


def test_no_connection_window_update_when_the_window_is_the_default() -> None:
    peer = Peer(limits=Limits(connection_window=65_535))
    assert kinds(peer.initial) == [fr.SETTINGS]


def test_valid_preface_and_settings_are_acknowledged() -> None:
    peer = Peer(handshake=False)
    assert peer.feed(fr.PREFACE + fr.settings({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 5})) == [
        SettingsChanged(5)
    ]
    assert kinds(peer.out()) == [fr.SETTINGS, fr.WINDOW_UPDATE, fr.SETTINGS]


def test_client_announces_before_anything_arrives() -> None:
    peer = Peer(Role.CLIENT, handshake=False)
    assert kinds(peer.initial) == [fr.SETTINGS, fr.WINDOW_UPDATE]
    # A client reports the peer's first SETTINGS: it learns the stream limit before it opens.
    assert peer.feed(fr.settings({})) == [SettingsChanged(1 << 31)]
    assert peer.out() == [Frame(fr.SETTINGS, fr.FLAG_ACK, 0, b"")]
    assert peer.feed(fr.settings({})) == []  # later ones only when the limit changes


@pytest.mark.parametrize(
    "line",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /echo.Echo/UnaryEcho HTTP/1.1\r\n",
        b"PUT /x HTTP/1.0\r\n",
        b"HEAD / HTTP/1.1\r\n",
        b"DELETE /x HTTP/1.1\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"PATCH /x HTTP/1.1\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n",
        b"TRACE / HTTP/1.1\r\n",
    ],
)
def test_http1_request_line_is_recognised(line: bytes) -> None:
    peer = Peer(handshake=False)
    with pytest.raises(Http1RequestError) as info:
        peer.feed(line)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert peer.out() == []  # no HTTP/2 frames for an HTTP/1 client


def test_http1_request_line_split_across_reads() -> None:
    peer = Peer(handshake=False)
    # "P" could start the HTTP/2 preface, POST, PUT or PATCH: the codec must wait.
    assert peer.feed(b"P") == []
    assert peer.feed(b"O") == []
    assert peer.feed(b"S") == []
    with pytest.raises(Http1RequestError):
        peer.feed(b"T /x HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"hello world, this is not http/2",
        b"get / HTTP/1.1\r\n",  # methods are case-sensitive
        b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",  # a SETTINGS frame without the preface
    ],
)
def test_garbage_instead_of_preface_is_a_protocol_error(garbage: bytes) -> None:
    exc = conn_error(Peer(handshake=False), garbage)
    assert exc.code is ErrorCode.PROTOCOL_ERROR
    assert not isinstance(exc, Http1RequestError)


def test_preface_split_across_reads_byte_by_byte() -> None:
    peer = Peer(handshake=False)
    stream = fr.PREFACE + fr.settings({}) + fr.ping(OPAQUE)
    for i in range(len(stream)):
        assert peer.feed(stream[i : i + 1]) == []
    assert peer.out()[-2:] == [
        Frame(fr.SETTINGS, fr.FLAG_ACK, 0, b""),
        Frame(fr.PING, fr.FLAG_ACK, 0, OPAQUE),
    ]


def test_preface_settings_and_request_in_one_read() -> None:
    peer = Peer(handshake=False)
    data = fr.PREFACE + fr.settings({}) + fr.headers(1, peer.block(REQUEST), end_stream=True)
    assert peer.feed(data) == [HeadersReceived(1, REQUEST, True, False)]


@pytest.mark.parametrize(
    "first", [fr.ping(OPAQUE), fr.SETTINGS_ACK, fr.window_update(0, 10), fr.frame(0xEE, 0, 0)]
)
def test_first_frame_after_the_preface_must_be_settings(first: bytes) -> None:
    exc = conn_error(Peer(handshake=False), fr.PREFACE + first)
    assert exc.code is ErrorCode.PROTOCOL_ERROR


def test_client_role_requires_settings_first_from_the_server() -> None:
    exc = conn_error(Peer(Role.CLIENT, handshake=False), fr.ping(OPAQUE))
    assert exc.code is ErrorCode.PROTOCOL_ERROR


# ---------------------------------------------------------------------------- SETTINGS, PING


def test_settings_changed_only_when_max_concurrent_streams_changes() -> None:
    peer = Peer()
    assert peer.feed(fr.settings({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 10})) == [SettingsChanged(10)]
    assert peer.conn.remote_max_concurrent_streams == 10
    assert peer.out() == [Frame(fr.SETTINGS, fr.FLAG_ACK, 0, b"")]
    assert peer.feed(fr.settings({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 10})) == []
    assert peer.feed(fr.settings({0x99: 1, fr.SETTINGS_ENABLE_PUSH: 1})) == []  # unknown: ignored
    assert kinds(peer.out()) == [fr.SETTINGS, fr.SETTINGS]


def test_settings_ack_from_the_peer_is_silent() -> None:
    peer = Peer()
    assert peer.feed(fr.SETTINGS_ACK) == []
    assert peer.out() == []


def test_max_concurrent_streams_setting_limits_can_open_stream() -> None:
    peer = Peer(Role.CLIENT, settings={fr.SETTINGS_MAX_CONCURRENT_STREAMS: 1})
    assert peer.conn.can_open_stream
    peer.conn.open_stream(REQUEST, end_stream=True)
    assert not peer.conn.can_open_stream


def test_max_frame_size_setting_sizes_outgoing_data() -> None:
    settings = {fr.SETTINGS_MAX_FRAME_SIZE: 32_768, fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}
    peer = Peer(settings=settings)
    open_request(peer, end_stream=True)
    respond(peer)
    assert peer.conn.send_data(1, b"x" * 40_000) == 40_000
    assert [len(f.payload) for f in peer.out()] == [32_768, 7_232]


def test_ping_is_answered_with_the_same_opaque_data() -> None:
    peer = Peer()
    assert peer.feed(fr.ping(OPAQUE)) == []
    assert peer.out() == [Frame(fr.PING, fr.FLAG_ACK, 0, OPAQUE)]


def test_ping_ack_becomes_an_event_and_is_not_answered() -> None:
    peer = Peer()
    peer.conn.ping(b"abcdefgh")
    assert peer.out() == [Frame(fr.PING, 0, 0, b"abcdefgh")]
    assert peer.feed(fr.ping(b"abcdefgh", ack=True)) == [PingAcked(b"abcdefgh")]
    assert peer.out() == []


# ---------------------------------------------------------------------------- WINDOW_UPDATE


def test_window_update_on_a_closed_stream_is_ignored() -> None:
    peer = Peer()
    open_request(peer, end_stream=True)
    peer.conn.send_headers(1, [*RESPONSE, (b"grpc-status", b"0")], True)
    peer.out()
    assert 1 not in peer.conn.streams
    assert peer.feed(fr.window_update(1, 100)) == []
    assert peer.out() == []


def test_window_update_of_zero_on_a_stream_resets_it() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.window_update(1, 0)) == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]
    assert 1 not in peer.conn.streams


def test_window_update_overflowing_a_stream_window_resets_it() -> None:
    peer = Peer()
    open_request(peer)
    # The stream's send window is the default 65,535: this takes it to 2^31.
    increment = fr.MAX_WINDOW - 65_535 + 1
    assert peer.feed(fr.window_update(1, increment)) == [
        StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, False)
    ]
    assert peer.out() == [rst(1, ErrorCode.FLOW_CONTROL_ERROR)]
    # One below overflows nothing.
    open_request(peer, sid=3)
    assert peer.feed(fr.window_update(3, increment - 1)) == []


# ---------------------------------------------------------------------------- stream lifecycle


def test_server_request_with_data_and_trailers_then_response() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.data(1, b"hello")) == [DataReceived(1, b"hello", False)]
    trailers = [(b"x-request-trailer", b"1")]
    assert peer.headers(1, trailers, end_stream=True) == [HeadersReceived(1, trailers, True, True)]
    assert peer.conn.streams[1].remote_closed

    peer.conn.send_headers(1, RESPONSE, False)
    assert peer.conn.send_data(1, b"world") == 5
    peer.conn.send_headers(1, TRAILERS, True)
    frames = peer.out()
    assert kinds(frames) == [fr.HEADERS, fr.DATA, fr.HEADERS]
    assert peer.decode(frames[0]) == RESPONSE and not frames[0].end_stream
    assert frames[1].payload == b"world" and not frames[1].end_stream
    assert peer.decode(frames[2]) == TRAILERS and frames[2].end_stream
    assert peer.conn.open_streams == 0


def test_server_request_ending_with_data() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.data(1, b"abc", end_stream=True)) == [DataReceived(1, b"abc", True)]
    peer.conn.send_headers(1, RESPONSE, False)
    peer.conn.send_data(1, b"", end_stream=True)
    frames = peer.out()
    assert kinds(frames) == [fr.HEADERS, fr.DATA]
    assert frames[1] == Frame(fr.DATA, fr.FLAG_END_STREAM, 1, b"")
    assert peer.conn.open_streams == 0


def test_unknown_frame_types_are_ignored() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.frame(0xEE, 0xFF, 1, b"whatever") + fr.frame(0x0A, 0, 0, b"x")) == []
    assert peer.feed(fr.data(1, b"ok")) == [DataReceived(1, b"ok", False)]


def test_pair_client_request_and_server_response() -> None:
    pair = Pair()
    sid = pair.client.open_stream(REQUEST, end_stream=False)
    assert sid == 1
    pair.client.send_data(sid, b"ping", end_stream=True)
    client_events, server_events = pair.pump()
    assert client_events == []
    assert server_events == [
        HeadersReceived(1, REQUEST, False, False),
        DataReceived(1, b"ping", True),
    ]

    pair.server.send_headers(1, RESPONSE, False)
    pair.server.send_data(1, b"pong")
    pair.server.send_headers(1, TRAILERS, True)
    client_events, server_events = pair.pump()
    assert client_events == [
        HeadersReceived(1, RESPONSE, False, False),
        DataReceived(1, b"pong", False),
        HeadersReceived(1, TRAILERS, True, True),
    ]
    assert server_events == []
    assert pair.client.open_streams == 0 and pair.server.open_streams == 0
    assert pair.client.open_stream(REQUEST, end_stream=True) == 3


def test_pair_client_reset_reaches_the_server() -> None:
    pair = Pair()
    sid = pair.client.open_stream(REQUEST, end_stream=False)
    pair.pump()
    pair.client.reset_stream(sid, ErrorCode.CANCEL)
    _, server_events = pair.pump()
    assert server_events == [StreamReset(sid, ErrorCode.CANCEL, True)]
    assert pair.client.open_streams == 0 and pair.server.open_streams == 0


def test_client_trailers_only_response() -> None:
    peer = Peer(Role.CLIENT)
    sid = peer.conn.open_stream(REQUEST, end_stream=True)
    assert peer.decode(peer.out()[0]) == REQUEST
    only = [(b":status", b"200"), (b"grpc-status", b"14")]
    assert peer.headers(sid, only, end_stream=True) == [HeadersReceived(sid, only, True, False)]
    assert peer.conn.open_streams == 0


def test_client_ignores_informational_responses() -> None:
    peer = Peer(Role.CLIENT)
    sid = peer.conn.open_stream(REQUEST, end_stream=True)
    assert peer.headers(sid, [(b":status", b"100")]) == []
    assert peer.headers(sid, RESPONSE) == [HeadersReceived(sid, RESPONSE, False, False)]
    assert peer.feed(fr.data(sid, b"x")) == [DataReceived(sid, b"x", False)]
    assert peer.headers(sid, TRAILERS, end_stream=True) == [
        HeadersReceived(sid, TRAILERS, True, True)
    ]


def test_client_streams_get_odd_increasing_ids() -> None:
    peer = Peer(Role.CLIENT)
    assert [peer.conn.open_stream(REQUEST, True) for _ in range(3)] == [1, 3, 5]
    frames = peer.out()
    assert [(f.kind, f.stream_id, f.end_stream) for f in frames] == [
        (fr.HEADERS, 1, True),
        (fr.HEADERS, 3, True),
        (fr.HEADERS, 5, True),
    ]


def test_client_receives_goaway() -> None:
    peer = Peer(Role.CLIENT)
    peer.conn.open_stream(REQUEST, end_stream=True)
    assert peer.feed(fr.goaway(1, ErrorCode.NO_ERROR, b"bye")) == [GoAwayReceived(1, 0, b"bye")]
    assert peer.conn.goaway_received == 1
    assert not peer.conn.can_open_stream


def test_server_refuses_streams_opened_after_its_goaway() -> None:
    peer = Peer()
    open_request(peer)
    peer.conn.goaway()
    assert peer.out() == [Frame(fr.GOAWAY, 0, 0, struct.pack(">II", 1, 0))]
    assert peer.headers(3, REQUEST) == []
    assert peer.out() == [rst(3, ErrorCode.REFUSED_STREAM)]
    assert peer.feed(fr.data(3, b"x")) == []  # refused by us: not even STREAM_CLOSED
    assert peer.out() == []
    assert peer.feed(fr.data(1, b"still here")) == [DataReceived(1, b"still here", False)]


def test_concurrent_stream_limit_refuses_the_extra_stream() -> None:
    peer = Peer(limits=Limits(max_concurrent_streams=2))
    open_request(peer, 1)
    open_request(peer, 3)
    assert peer.headers(5, REQUEST) == []
    assert peer.out() == [rst(5, ErrorCode.REFUSED_STREAM)]
    assert peer.feed(fr.data(5, b"late")) == []  # refused by us: dropped silently
    assert peer.feed(fr.rst_stream(1, ErrorCode.CANCEL)) == [StreamReset(1, ErrorCode.CANCEL, True)]
    open_request(peer, 7)  # a slot is free again


# ---------------------------------------------------------------------------- flow control


def test_send_data_beyond_the_stream_window_queues_until_window_update() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 100})
    open_request(peer, end_stream=True)
    respond(peer)
    assert peer.conn.send_data(1, b"a" * 250) == 100
    assert [(f.kind, len(f.payload)) for f in peer.out()] == [(fr.DATA, 100)]
    assert peer.conn.pending_bytes(1) == 150

    assert peer.feed(fr.window_update(1, 60)) == [DataFlushed(1, 60)]
    assert [len(f.payload) for f in peer.out()] == [60]
    assert peer.feed(fr.window_update(1, 1000)) == [DataFlushed(1, 90)]
    assert [len(f.payload) for f in peer.out()] == [90]
    assert peer.conn.pending_bytes(1) == 0


def _answered(peer: Peer, sids: tuple[int, ...]) -> None:
    """Requests `sids` received whole and their response headers sent."""
    for sid in sids:
        open_request(peer, sid, end_stream=True)
        respond(peer, sid)


def test_connection_window_limits_all_streams_and_window_update_flushes_them() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    _answered(peer, (1, 3))
    # The peer's connection window is the default 65,535.
    assert peer.conn.send_data(1, b"a" * 70_000) == 65_535
    assert [len(f.payload) for f in peer.out()] == [16_384, 16_384, 16_384, 16_383]
    assert peer.conn.send_data(3, b"b" * 10) == 0
    assert peer.out() == []
    events = peer.feed(fr.window_update(0, 10_000))
    # Stream 3 has sent nothing yet: its first frame goes before stream 1's backlog.
    assert events == [DataFlushed(3, 10), DataFlushed(1, 4_465)]
    assert [(f.stream_id, len(f.payload)) for f in peer.out()] == [(3, 10), (1, 4_465)]


def _spend_connection_window(peer: Peer, sids: tuple[int, ...], size: int) -> None:
    """Streams `sids` opened and answered, each sending 100 bytes; stream sids[0] spends the
    rest of the peer's connection window (the default 65,535); each then queues `size` bytes
    the connection holds back."""
    _answered(peer, sids)
    for sid in sids:
        assert peer.conn.send_data(sid, b"w" * 100) == 100
    rest = 65_535 - 100 * len(sids)
    assert peer.conn.send_data(sids[0], b"w" * rest) == rest
    peer.out()
    for sid in sids:
        assert peer.conn.send_data(sid, bytes([sid]) * size) == 0
    assert peer.out() == []


def test_streams_held_back_by_the_connection_window_take_turns_a_frame_each() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    _spend_connection_window(peer, (1, 3, 5), 100_000)
    peer.feed(fr.window_update(0, 4 * 16_384))
    # Round-robin in the order they queued, one frame per turn, not stream 1 until it is done.
    assert [(f.stream_id, len(f.payload)) for f in peer.out()] == [
        (1, 16_384), (3, 16_384), (5, 16_384), (1, 16_384)
    ]  # fmt: skip
    peer.feed(fr.window_update(0, 2 * 16_384))
    assert [f.stream_id for f in peer.out()] == [3, 5]
    assert [peer.conn.pending_bytes(s) for s in (1, 3, 5)] == [100_000 - 2 * 16_384,
                                                                100_000 - 2 * 16_384,
                                                                100_000 - 2 * 16_384]  # fmt: skip


def test_a_new_small_call_is_not_queued_behind_other_streams_backlogs() -> None:
    """Issue 13: a well-behaved call sharing a backend connection with an attack's uploads
    waited for all of them. Its request goes out with the first window the peer gives."""
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    _spend_connection_window(peer, tuple(range(1, 200, 2)), 1 << 20)
    _answered(peer, (201,))
    assert peer.conn.send_data(201, b"small", end_stream=True) == 0
    peer.feed(fr.window_update(0, 16_384))
    frames = peer.out()
    assert (frames[0].stream_id, frames[0].payload, frames[0].flags & fr.FLAG_END_STREAM) == (
        201, b"small", fr.FLAG_END_STREAM
    )  # fmt: skip


def test_a_stream_reset_while_held_back_gets_nothing_and_leaves_the_queue() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    _spend_connection_window(peer, (1, 3), 1_000)
    peer.conn.reset_stream(1)
    peer.out()
    peer.feed(fr.window_update(0, 100_000))
    assert [(f.stream_id, len(f.payload)) for f in peer.out()] == [(3, 1_000)]


def test_streams_reset_while_the_peer_gives_no_window_do_not_grow_the_queue() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    _spend_connection_window(peer, (1,), 10)
    for sid in range(3, 3 + 2 * 1_000, 2):
        _answered(peer, (sid,))
        peer.conn.send_data(sid, b"x" * 10)
        peer.conn.reset_stream(sid)
        peer.out()
    assert len(peer.conn._fresh) + len(peer.conn._waiting) <= 2 * 64 + 1
    peer.feed(fr.window_update(0, 100))
    assert [(f.stream_id, len(f.payload)) for f in peer.out()] == [(1, 10)]


def test_a_paused_transport_holds_data_and_resumes_streams_in_turn() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    _answered(peer, (1, 3))
    assert peer.conn.send_data(1, b"a" * 100) == 100
    peer.out()
    peer.conn.pause_writing()
    assert peer.conn.send_data(1, b"a" * 40_000) == 0
    assert peer.conn.send_data(3, b"b" * 10, end_stream=True) == 0
    assert peer.out() == []
    assert peer.conn.resume_writing() == [
        DataFlushed(3, 10), DataFlushed(1, 16_384), DataFlushed(1, 16_384), DataFlushed(1, 7_232)
    ]  # fmt: skip
    frames = peer.out()
    assert [(f.stream_id, len(f.payload)) for f in frames] == [
        (3, 10), (1, 16_384), (1, 16_384), (1, 7_232)
    ]  # fmt: skip
    assert frames[0].flags & fr.FLAG_END_STREAM


def test_initial_window_size_change_adjusts_open_streams() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 100})
    open_request(peer, end_stream=True)
    respond(peer)
    assert peer.conn.send_data(1, b"a" * 250) == 100
    peer.out()
    # +200 for every open stream: 150 queued bytes leave at once.
    assert peer.feed(fr.settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 300})) == [DataFlushed(1, 150)]
    assert kinds(peer.out()) == [fr.SETTINGS, fr.DATA]
    # The window is now 300 - 250 = 50; shrinking by 200 makes it -150: a 160 update leaves 10.
    assert peer.feed(fr.settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 100})) == []
    assert peer.conn.send_data(1, b"b" * 30) == 0
    peer.out()
    assert peer.feed(fr.window_update(1, 150)) == []
    assert peer.feed(fr.window_update(1, 10)) == [DataFlushed(1, 10)]
    assert [len(f.payload) for f in peer.out()] == [10]


def test_settings_overflowing_a_stream_window_is_a_connection_error() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.window_update(1, fr.MAX_WINDOW - 65_535)) == []  # exactly 2^31-1
    exc = conn_error(peer, fr.settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 65_536}))
    assert exc.code is ErrorCode.FLOW_CONTROL_ERROR


def test_data_ending_the_stream_is_queued_with_end_stream() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 10})
    open_request(peer, end_stream=True)
    respond(peer)
    assert peer.conn.send_data(1, b"x" * 25, end_stream=True) == 10
    assert [(len(f.payload), f.end_stream) for f in peer.out()] == [(10, False)]
    assert peer.feed(fr.window_update(1, 100)) == [DataFlushed(1, 15)]
    assert [(len(f.payload), f.end_stream) for f in peer.out()] == [(15, True)]
    assert peer.conn.open_streams == 0


def test_trailers_wait_behind_flow_controlled_data() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 10})
    open_request(peer, end_stream=True)
    respond(peer)
    assert peer.conn.send_data(1, b"x" * 100) == 10
    peer.conn.send_headers(1, TRAILERS, True)
    assert [(f.kind, len(f.payload)) for f in peer.out()] == [(fr.DATA, 10)]  # no trailers yet
    assert peer.conn.open_streams == 1
    assert peer.feed(fr.window_update(1, 50)) == [DataFlushed(1, 50)]
    assert [(f.kind, len(f.payload)) for f in peer.out()] == [(fr.DATA, 50)]
    assert peer.feed(fr.window_update(1, 40)) == [DataFlushed(1, 40)]
    data, trailers = peer.out()
    assert (data.kind, len(data.payload), data.end_stream) == (fr.DATA, 40, False)
    assert trailers.kind == fr.HEADERS and trailers.end_stream
    assert peer.decode(trailers) == TRAILERS
    assert peer.conn.open_streams == 0


def test_paused_writing_holds_data_until_resumed() -> None:
    peer = Peer()
    open_request(peer, end_stream=True)
    respond(peer)
    peer.conn.pause_writing()
    assert peer.conn.send_data(1, b"held") == 0
    assert peer.out() == []
    assert peer.conn.resume_writing() == [DataFlushed(1, 4)]
    assert peer.out() == [Frame(fr.DATA, 0, 1, b"held")]


def test_ack_data_sends_window_update_only_past_the_threshold() -> None:
    peer = Peer(limits=Limits(stream_window=1000))  # threshold: 250
    open_request(peer)
    assert peer.feed(fr.data(1, b"x" * 200)) == [DataReceived(1, b"x" * 200, False)]
    peer.conn.ack_data(1, 200)
    assert peer.out() == []
    assert peer.feed(fr.data(1, b"y" * 60)) == [DataReceived(1, b"y" * 60, False)]
    peer.conn.ack_data(1, 49)
    assert peer.out() == []
    peer.conn.ack_data(1, 11)
    assert peer.out() == [Frame(fr.WINDOW_UPDATE, 0, 1, U32.pack(260))]
    peer.conn.ack_data(1, 0)
    assert peer.out() == []


def test_acknowledged_data_restores_the_stream_window() -> None:
    peer = Peer(limits=Limits(stream_window=1000))
    open_request(peer)
    for _ in range(5):  # 5 x 1000 bytes through a 1000-byte window
        assert peer.feed(fr.data(1, b"z" * 1000)) == [DataReceived(1, b"z" * 1000, False)]
        peer.conn.ack_data(1, 1000)
        assert peer.out() == [Frame(fr.WINDOW_UPDATE, 0, 1, U32.pack(1000))]


def test_connection_window_is_credited_on_receipt() -> None:
    # The user never acknowledges: the connection window must be returned anyway (at half the
    # window), while the stream window is not.
    peer = Peer(limits=Limits(connection_window=128 * KiB, stream_window=256 * KiB))
    open_request(peer)
    for _ in range(3):
        peer.feed(fr.data(1, b"d" * 16_384))
        assert peer.out() == []
    peer.feed(fr.data(1, b"d" * 16_384))
    assert peer.out() == [Frame(fr.WINDOW_UPDATE, 0, 0, U32.pack(65_536))]


def test_data_on_a_refused_stream_still_counts_for_the_connection_window() -> None:
    peer = Peer(limits=Limits(connection_window=128 * KiB, max_concurrent_streams=1))
    open_request(peer)
    assert peer.headers(3, REQUEST) == []
    assert peer.out() == [rst(3, ErrorCode.REFUSED_STREAM)]
    for _ in range(4):
        assert peer.feed(fr.data(3, b"d" * 16_384)) == []
    assert peer.out() == [Frame(fr.WINDOW_UPDATE, 0, 0, U32.pack(65_536))]


def test_exceeding_a_stream_window_resets_the_stream() -> None:
    peer = Peer(limits=Limits(stream_window=1000))
    open_request(peer)
    assert peer.feed(fr.data(1, b"x" * 600)) == [DataReceived(1, b"x" * 600, False)]
    assert peer.feed(fr.data(1, b"x" * 401)) == [
        StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, False)
    ]
    assert peer.out() == [rst(1, ErrorCode.FLOW_CONTROL_ERROR)]
    assert peer.feed(fr.ping(OPAQUE)) == []  # the connection lives on
    assert peer.out() == [Frame(fr.PING, fr.FLAG_ACK, 0, OPAQUE)]


def test_padding_counts_against_the_stream_window() -> None:
    peer = Peer(limits=Limits(stream_window=1000))
    open_request(peer)
    padded = bytes([200]) + b"0123456789" + b"\x00" * 200  # 211 bytes of flow control
    assert peer.feed(fr.frame(fr.DATA, fr.FLAG_PADDED, 1, padded)) == [
        DataReceived(1, b"0123456789", False)
    ]
    assert peer.feed(fr.data(1, b"x" * 789)) == [DataReceived(1, b"x" * 789, False)]
    assert peer.feed(fr.data(1, b"!")) == [StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, False)]


def test_padding_is_returned_with_the_acknowledged_data() -> None:
    peer = Peer(limits=Limits(stream_window=1000))
    open_request(peer)
    padded = bytes([200]) + b"0123456789" + b"\x00" * 200
    peer.feed(fr.frame(fr.DATA, fr.FLAG_PADDED, 1, padded))
    peer.conn.ack_data(1, 10)
    assert peer.out() == []  # 211 < 250
    peer.feed(fr.data(1, b"x" * 39))
    peer.conn.ack_data(1, 39)
    assert peer.out() == [Frame(fr.WINDOW_UPDATE, 0, 1, U32.pack(250))]


def test_exceeding_the_connection_window_is_a_connection_error() -> None:
    # The connection window is credited on receipt at half the window, so only a frame larger
    # than the remaining window can overrun it: allow large frames to make that possible.
    limits = Limits(connection_window=65_535, stream_window=1 << 20, max_frame_size=1 << 17)
    peer = Peer(limits=limits)
    open_request(peer)
    assert peer.feed(fr.data(1, b"x" * 30_000)) == [DataReceived(1, b"x" * 30_000, False)]
    exc = conn_error(peer, fr.data(1, b"x" * 35_536))
    assert exc.code is ErrorCode.FLOW_CONTROL_ERROR


# ---------------------------------------------------------------------------- copies

# A large window, so that 64 KiB payloads go out at once (RFC 9113 6.5.2 SETTINGS_INITIAL_...).
BIG_WINDOWS = {fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20, fr.SETTINGS_MAX_FRAME_SIZE: 1 << 16}


def test_big_payloads_are_queued_apart_from_their_header() -> None:
    """What a gathering transport writes (take_output: one writev) holds the payload object
    itself, not a copy of it behind its header; the joined output is the same bytes."""
    peer = Peer(settings=BIG_WINDOWS)
    peer.feed(fr.window_update(0, 1 << 20))
    open_request(peer)
    respond(peer)
    big = bytes(range(256)) * 200  # 51,200 bytes: over _GATHER_MIN, under the frame size
    small = b"s" * 100
    assert peer.conn.send_data(1, big) == len(big)
    assert peer.conn.gathered
    assert peer.conn.send_data(1, small) == len(small)
    out = peer.conn.take_output()
    assert not peer.conn.gathered
    assert out[1] is big  # the very object: no copy
    assert b"".join(out) == fr.data(1, big) + fr.data(1, small)
    assert len(out) == 3  # header, payload, then the small frame in one piece
    assert peer.conn.take_output() == []
    # data_to_send joins the same way, for transports that do not gather.
    assert peer.conn.send_data(1, big, end_stream=True) == len(big)
    assert peer.conn.data_to_send() == fr.data(1, big, end_stream=True)
    assert not peer.conn.gathered


def test_a_frame_across_reads_is_completed_and_the_rest_parsed_in_place() -> None:
    """A read that ends inside a frame leaves its start behind; the next read completes it and
    the frames after it in that read come out as they would from one read."""
    peer = Peer(settings=BIG_WINDOWS)
    open_request(peer)
    first = b"a" * 15_000
    second = b"b" * 300
    third = b"c" * 5_000
    stream = fr.data(1, first) + fr.data(1, second) + fr.data(1, third, end_stream=True)
    cut1 = 9 + 1_000  # inside the first frame's payload
    cut2 = len(fr.data(1, first)) + len(fr.data(1, second)) + 9 + 10  # inside the third
    events = peer.feed(stream[:cut1])
    events += peer.feed(stream[cut1:cut2])
    events += peer.feed(stream[cut2:])
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == first + second + third
    assert [e.end_stream for e in events if isinstance(e, DataReceived)][-1]
    # A header cut in two (fewer than 9 bytes left) still joins.
    peer2 = Peer(settings=BIG_WINDOWS)
    open_request(peer2)
    frame = fr.data(1, second, end_stream=True)
    assert peer2.feed(frame[:4]) == []
    assert peer2.feed(frame[4:]) == [DataReceived(1, second, True)]


# ---------------------------------------------------------------------------- CONTINUATION


def test_continuation_frames_are_reassembled() -> None:
    peer = Peer()
    block = peer.block([*REQUEST, (b"x-long", b"v" * 50)])
    data = fr.headers(1, block, end_stream=True, max_frame_size=16)
    frames = parse(data)
    assert len(frames) > 3 and frames[1].kind == fr.CONTINUATION
    headers = [*REQUEST, (b"x-long", b"v" * 50)]
    assert peer.feed(data) == [HeadersReceived(1, headers, True, False)]


def test_continuation_split_across_reads() -> None:
    peer = Peer()
    headers = [*REQUEST, (b"x-long", b"w" * 40)]
    data = fr.headers(1, peer.block(headers), max_frame_size=10)
    events: list[Event] = []
    for i in range(0, len(data), 7):
        events += peer.feed(data[i : i + 7])
    assert events == [HeadersReceived(1, headers, False, False)]


def test_trailers_in_continuation_frames() -> None:
    peer = Peer()
    open_request(peer)
    trailers = [(b"x-t", b"t" * 30)]
    data = fr.headers(1, peer.block(trailers), end_stream=True, max_frame_size=8)
    assert peer.feed(data) == [HeadersReceived(1, trailers, True, True)]


def continuation_run(peer: Peer, sid: int, count: int, end: bool = True) -> bytes:
    """HEADERS with the whole block, then `count` empty CONTINUATION frames."""
    parts = [fr.frame(fr.HEADERS, 0, sid, peer.block(REQUEST))]
    parts += [fr.frame(fr.CONTINUATION, 0, sid, b"") for _ in range(count - 1)]
    parts.append(fr.frame(fr.CONTINUATION, fr.FLAG_END_HEADERS if end else 0, sid, b""))
    return b"".join(parts)


def test_continuation_cap_allows_exactly_the_limit() -> None:
    peer = Peer()
    assert peer.feed(continuation_run(peer, 1, 32)) == [HeadersReceived(1, REQUEST, False, False)]


def test_continuation_cap_trips_past_the_limit() -> None:
    peer = Peer()
    with pytest.raises(FloodError) as info:
        peer.feed(continuation_run(peer, 1, 33, end=False))
    assert info.value.limit == "continuation_frames"
    assert info.value.code is ErrorCode.ENHANCE_YOUR_CALM


def test_header_block_size_cap_trips_before_decoding() -> None:
    peer = Peer()  # 64 KiB list + 16 KiB slack = 80 KiB of block
    chunk = b"\x00" * 16_384
    data = fr.frame(fr.HEADERS, 0, 1, chunk)
    data += b"".join(fr.frame(fr.CONTINUATION, 0, 1, chunk) for _ in range(4))
    assert peer.feed(data) == []  # exactly 80 KiB so far
    with pytest.raises(FloodError) as info:
        peer.feed(fr.frame(fr.CONTINUATION, 0, 1, b"\x00"))
    assert info.value.limit == "header_list_size"


# ---------------------------------------------------------------------------- protocol errors


def _hdr(flags: int, sid: int, payload: bytes) -> bytes:
    return fr.frame(fr.HEADERS, flags, sid, payload)


EH = fr.FLAG_END_HEADERS
REQ_BLOCK = b"\x83\x86\x84"  # :method POST, :scheme http, :path / (static table)

CONNECTION_ERRORS = [
    # Frame layer.
    ("frame over max size", fr.frame_header(fr.DATA, 0, 1, 16_385), ErrorCode.FRAME_SIZE_ERROR),
    ("DATA on stream 0", fr.data(0, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("DATA on idle stream", fr.data(1, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("DATA on even stream", fr.data(2, b"x"), ErrorCode.PROTOCOL_ERROR),
    (
        "DATA padding too long",
        fr.frame(fr.DATA, fr.FLAG_PADDED, 1, b"\x04abc"),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("DATA padded and empty", fr.frame(fr.DATA, fr.FLAG_PADDED, 1, b""), ErrorCode.PROTOCOL_ERROR),
    ("HEADERS on stream 0", _hdr(EH, 0, REQ_BLOCK), ErrorCode.PROTOCOL_ERROR),
    ("HEADERS padded and empty", _hdr(EH | fr.FLAG_PADDED, 1, b""), ErrorCode.FRAME_SIZE_ERROR),
    (
        "HEADERS priority too short",
        _hdr(EH | fr.FLAG_PRIORITY, 1, b"\x00\x00\x00"),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    (
        "HEADERS padding too long",
        _hdr(EH | fr.FLAG_PADDED, 1, b"\x04" + REQ_BLOCK),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("HEADERS on even stream", _hdr(EH, 2, REQ_BLOCK), ErrorCode.PROTOCOL_ERROR),
    ("HPACK index 0", _hdr(EH, 1, b"\x80"), ErrorCode.COMPRESSION_ERROR),
    ("HPACK index out of range", _hdr(EH, 1, b"\xff\xff\x7f"), ErrorCode.COMPRESSION_ERROR),
    ("HPACK truncated literal", _hdr(EH, 1, b"\x40\x05ab"), ErrorCode.COMPRESSION_ERROR),
    ("HPACK truncated integer", _hdr(EH, 1, b"\xff"), ErrorCode.COMPRESSION_ERROR),
    ("HPACK table size over 4096", _hdr(EH, 1, b"\x3f\xe2\x1f"), ErrorCode.COMPRESSION_ERROR),
    (
        "HPACK size update after a field",
        _hdr(EH, 1, b"\x82\x20"),
        ErrorCode.COMPRESSION_ERROR,
    ),
    (
        "HPACK bad huffman",
        _hdr(EH, 1, b"\x82\x86\x84\x00\x81\xff\x01a"),  # huffman name of one EOS-ish byte
        ErrorCode.COMPRESSION_ERROR,
    ),
    ("PRIORITY on stream 0", fr.frame(fr.PRIORITY, 0, 0, b"\x00" * 5), ErrorCode.PROTOCOL_ERROR),
    ("RST_STREAM on stream 0", fr.rst_stream(0, 8), ErrorCode.PROTOCOL_ERROR),
    (
        "RST_STREAM too short",
        fr.frame(fr.RST_STREAM, 0, 1, b"\x00" * 3),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("RST_STREAM on idle stream", fr.rst_stream(1, 8), ErrorCode.PROTOCOL_ERROR),
    ("SETTINGS on a stream", fr.frame(fr.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
    (
        "SETTINGS ACK with payload",
        fr.frame(fr.SETTINGS, fr.FLAG_ACK, 0, b"\x00" * 6),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("SETTINGS not 6n", fr.frame(fr.SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
    ("ENABLE_PUSH 2", fr.settings({fr.SETTINGS_ENABLE_PUSH: 2}), ErrorCode.PROTOCOL_ERROR),
    (
        "INITIAL_WINDOW_SIZE 2^31",
        fr.settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 31}),
        ErrorCode.FLOW_CONTROL_ERROR,
    ),
    (
        "MAX_FRAME_SIZE too small",
        fr.settings({fr.SETTINGS_MAX_FRAME_SIZE: 16_383}),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "MAX_FRAME_SIZE too large",
        fr.settings({fr.SETTINGS_MAX_FRAME_SIZE: 1 << 24}),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "PUSH_PROMISE",
        fr.frame(fr.PUSH_PROMISE, EH, 1, b"\x00\x00\x00\x02" + REQ_BLOCK),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("PING on a stream", fr.frame(fr.PING, 0, 1, OPAQUE), ErrorCode.PROTOCOL_ERROR),
    ("PING too short", fr.frame(fr.PING, 0, 0, b"\x00" * 7), ErrorCode.FRAME_SIZE_ERROR),
    (
        "PING ACK too long",
        fr.frame(fr.PING, fr.FLAG_ACK, 0, b"\x00" * 9),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("GOAWAY on a stream", fr.frame(fr.GOAWAY, 0, 1, b"\x00" * 8), ErrorCode.PROTOCOL_ERROR),
    ("GOAWAY too short", fr.frame(fr.GOAWAY, 0, 0, b"\x00" * 7), ErrorCode.FRAME_SIZE_ERROR),
    (
        "WINDOW_UPDATE too short",
        fr.frame(fr.WINDOW_UPDATE, 0, 0, b"\x00" * 3),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("WINDOW_UPDATE of 0 on the connection", fr.window_update(0, 0), ErrorCode.PROTOCOL_ERROR),
    (
        "connection window over 2^31-1",
        fr.window_update(0, fr.MAX_WINDOW - 65_535 + 1),
        ErrorCode.FLOW_CONTROL_ERROR,
    ),
    ("WINDOW_UPDATE on idle stream", fr.window_update(1, 1), ErrorCode.PROTOCOL_ERROR),
    (
        "CONTINUATION without HEADERS",
        fr.frame(fr.CONTINUATION, EH, 1, REQ_BLOCK),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "header block interrupted by PING",
        _hdr(0, 1, REQ_BLOCK) + fr.ping(OPAQUE),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "header block interrupted by an unknown frame",
        _hdr(0, 1, REQ_BLOCK) + fr.frame(0xEE, 0, 0, b""),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "CONTINUATION on another stream",
        _hdr(0, 1, REQ_BLOCK) + fr.frame(fr.CONTINUATION, EH, 3, b""),
        ErrorCode.PROTOCOL_ERROR,
    ),
]


@pytest.mark.parametrize(
    ("data", "code"),
    [pytest.param(data, code, id=name) for name, data, code in CONNECTION_ERRORS],
)
def test_connection_error(data: bytes, code: ErrorCode) -> None:
    exc = conn_error(Peer(), data)
    assert exc.code is code
    assert not isinstance(exc, FloodError)


def test_headers_on_a_stream_closed_normally_is_a_connection_error() -> None:
    peer = Peer()
    open_request(peer, end_stream=True)
    peer.conn.send_headers(1, [*RESPONSE, (b"grpc-status", b"0")], True)
    assert peer.conn.open_streams == 0
    assert conn_error(peer, fr.headers(1, REQ_BLOCK)).code is ErrorCode.STREAM_CLOSED


def test_headers_on_a_lower_closed_stream_after_a_newer_one_is_a_connection_error() -> None:
    peer = Peer()
    open_request(peer, 1, end_stream=True)
    peer.conn.send_headers(1, [*RESPONSE, (b"grpc-status", b"0")], True)
    open_request(peer, 3)
    assert conn_error(peer, fr.headers(1, REQ_BLOCK)).code is ErrorCode.STREAM_CLOSED


def test_client_role_headers_on_a_stream_never_opened() -> None:
    peer = Peer(Role.CLIENT)
    assert conn_error(peer, fr.headers(1, peer.block(RESPONSE))).code is ErrorCode.PROTOCOL_ERROR


def test_client_role_rejects_push_promise() -> None:
    peer = Peer(Role.CLIENT)
    peer.conn.open_stream(REQUEST, end_stream=True)
    data = fr.frame(fr.PUSH_PROMISE, EH, 1, b"\x00\x00\x00\x02" + REQ_BLOCK)
    assert conn_error(peer, data).code is ErrorCode.PROTOCOL_ERROR


# ---------------------------------------------------------------------------- stream errors


def test_data_after_end_stream_resets_the_half_closed_stream() -> None:
    peer = Peer()
    open_request(peer, end_stream=True)
    assert peer.feed(fr.data(1, b"late")) == [StreamReset(1, ErrorCode.STREAM_CLOSED, False)]
    assert peer.out() == [rst(1, ErrorCode.STREAM_CLOSED)]
    assert peer.conn.open_streams == 0


def test_headers_after_end_stream_resets_the_half_closed_stream() -> None:
    peer = Peer()
    open_request(peer, end_stream=True)
    assert peer.headers(1, TRAILERS, end_stream=True) == [
        StreamReset(1, ErrorCode.STREAM_CLOSED, False)
    ]
    assert peer.out() == [rst(1, ErrorCode.STREAM_CLOSED)]


def test_data_on_a_fully_closed_stream_gets_stream_closed() -> None:
    peer = Peer()
    open_request(peer, end_stream=True)
    peer.conn.send_headers(1, [*RESPONSE, (b"grpc-status", b"0")], True)
    peer.out()
    assert peer.feed(fr.data(1, b"late")) == []
    assert peer.out() == [rst(1, ErrorCode.STREAM_CLOSED)]


def test_frames_on_a_stream_reset_by_us_are_ignored_but_hpack_stays_in_step() -> None:
    peer = Peer()
    open_request(peer)
    peer.conn.reset_stream(1, ErrorCode.CANCEL)
    assert peer.out() == [rst(1, ErrorCode.CANCEL)]
    assert peer.feed(fr.data(1, b"in flight")) == []
    # These trailers add an entry to the HPACK table even though the stream is gone...
    assert peer.headers(1, [(b"x-new-entry", b"v1")], end_stream=True) == []
    assert peer.out() == []
    # ...and the next block refers to it by index: the codec must have decoded the dropped one.
    headers = [*REQUEST, (b"x-new-entry", b"v1")]
    block = peer.block(headers)
    assert b"\xbe" in block  # index 62: the newest dynamic entry
    assert peer.feed(fr.headers(3, block)) == [HeadersReceived(3, headers, False, False)]


def test_frames_on_a_stream_reset_by_the_peer_get_stream_closed() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.rst_stream(1, ErrorCode.CANCEL)) == [StreamReset(1, ErrorCode.CANCEL, True)]
    assert peer.feed(fr.data(1, b"x")) == []
    assert peer.out() == [rst(1, ErrorCode.STREAM_CLOSED)]
    assert peer.headers(1, TRAILERS, end_stream=True) == []
    assert peer.out() == [rst(1, ErrorCode.STREAM_CLOSED)]
    assert peer.feed(fr.rst_stream(1, ErrorCode.CANCEL)) == []  # a second RST: ignored
    assert peer.out() == []


def test_priority_self_dependency_resets_an_open_stream() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.priority(1, 1)) == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]


def test_priority_with_wrong_length_resets_an_open_stream() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.frame(fr.PRIORITY, 0, 1, b"\x00" * 4)) == [
        StreamReset(1, ErrorCode.FRAME_SIZE_ERROR, False)
    ]
    assert peer.out() == [rst(1, ErrorCode.FRAME_SIZE_ERROR)]


def test_valid_priority_frames_are_ignored() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.priority(1, 0) + fr.priority(5, 1, exclusive=True)) == []
    assert peer.out() == []
    open_request(peer, 5)  # a PRIORITY frame does not open (or close) a stream


def test_headers_with_self_dependency_refuses_the_new_stream() -> None:
    peer = Peer()
    payload = struct.pack(">IB", 1, 15) + peer.block(REQUEST)
    assert peer.feed(fr.frame(fr.HEADERS, EH | fr.FLAG_PRIORITY, 1, payload)) == []
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]


def test_headers_with_priority_and_padding_are_accepted() -> None:
    peer = Peer()
    payload = b"\x03" + struct.pack(">IB", 0, 15) + peer.block(REQUEST) + b"\x00" * 3
    flags = EH | fr.FLAG_PRIORITY | fr.FLAG_PADDED
    assert peer.feed(fr.frame(fr.HEADERS, flags, 1, payload)) == [
        HeadersReceived(1, REQUEST, False, False)
    ]


# ---------------------------------------------------------------------------- header validation


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [h for h in REQUEST if h[0] != name]


BAD_REQUESTS = {
    "uppercase name": [*REQUEST, (b"X-Upper", b"1")],
    "pseudo after regular": [*REQUEST[:2], (b"x-a", b"1"), *REQUEST[2:]],
    "unknown pseudo": [(b":foo", b"bar"), *REQUEST],
    "response pseudo in request": [(b":status", b"200"), *REQUEST],
    "duplicate pseudo": [(b":path", b"/a"), *REQUEST],
    "missing :method": _without(b":method"),
    "missing :scheme": _without(b":scheme"),
    "missing :path": _without(b":path"),
    "empty :path": [(b":path", b""), *_without(b":path")],
    "connection": [*REQUEST, (b"connection", b"close")],
    "keep-alive": [*REQUEST, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [*REQUEST, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [*REQUEST, (b"transfer-encoding", b"chunked")],
    "upgrade": [*REQUEST, (b"upgrade", b"h2c")],
    "te other than trailers": [*_without(b"te"), (b"te", b"gzip")],
    "te trailers with more": [*_without(b"te"), (b"te", b"trailers, gzip")],
    "content-length not a number": [*REQUEST, (b"content-length", b"12a")],
    "content-length negative": [*REQUEST, (b"content-length", b"-1")],
    "content-length conflicting": [*REQUEST, (b"content-length", b"1"), (b"content-length", b"2")],
    # RFC 9113 8.2.1: what an HTTP/1 hop further on could read as the end of a field.
    "NUL in a value": [*REQUEST, (b"x-a", b"a\x00b")],
    "CR in a value": [*REQUEST, (b"x-a", b"a\rb")],
    "LF in a value": [*REQUEST, (b"x-a", b"a\nb")],
    "CR LF in :path": [(b":path", b"/x\r\nHost: evil"), *_without(b":path")],
    "leading space": [*REQUEST, (b"x-a", b" a")],
    "trailing tab": [*REQUEST, (b"x-a", b"a\t")],
    "only a space": [*REQUEST, (b"x-a", b" ")],
    "empty name": [*REQUEST, (b"", b"a")],
}


@pytest.mark.parametrize("headers", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_request_is_reset_and_not_surfaced(headers: list[tuple[bytes, bytes]]) -> None:
    peer = Peer()
    assert peer.headers(1, headers) == []
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]
    assert peer.conn.open_streams == 0
    assert peer.feed(fr.data(1, b"x")) == []  # reset by us: dropped
    open_request(peer, 3)  # the connection is fine


GOOD_REQUESTS = {
    "te trailers": REQUEST,
    "pseudo order free": [REQUEST[2], REQUEST[0], REQUEST[3], REQUEST[1], *REQUEST[4:]],
    "no :authority": _without(b":authority"),
    "content-length repeated equal": [*REQUEST, *[(b"content-length", b"0")] * 2],
    # -bin values travel base64-encoded; raw NUL is forbidden (RFC 9113 8.2.1).
    "binary metadata": [*REQUEST, (b"x-bin", b"AP8=")],
    "obs-text value": [*REQUEST, (b"x-text", b"caf\xc3\xa9 \xff")],
}


@pytest.mark.parametrize("headers", GOOD_REQUESTS.values(), ids=GOOD_REQUESTS.keys())
def test_well_formed_request_is_accepted(headers: list[tuple[bytes, bytes]]) -> None:
    peer = Peer()
    assert peer.headers(1, headers, end_stream=True) == [HeadersReceived(1, headers, True, False)]


def test_fields_known_good_do_not_vouch_for_others() -> None:
    """The checks remember names and values that passed (a block that misses the decoder's
    cache is mostly fields seen before): a remembered value must not let a near twin through,
    and a peer sending new values every time must not grow what is remembered."""
    peer = Peer()
    good = [*REQUEST, (b"x-a", b"value")]
    assert peer.headers(1, good, end_stream=True) == [HeadersReceived(1, good, True, False)]
    for sid, bad in enumerate((b"value ", b" value", b"value\r\n", b"val\x00ue"), start=1):
        assert peer.headers(2 * sid + 1, [*REQUEST, (b"x-a", bad)]) == []
        assert peer.out() == [rst(2 * sid + 1, ErrorCode.PROTOCOL_ERROR)]
    assert peer.headers(11, [*REQUEST, (b"X-A", b"value")]) == []  # the name, upper case
    for n in range(3 * validation._KNOWN_MAX):
        assert validation.validate_request([*REQUEST, (b"x-%d" % n, b"v%d" % n)]) == -1
    assert len(validation._good_values) <= validation._KNOWN_MAX
    assert len(validation._good_names) <= validation._KNOWN_MAX
    long = b"v" * (validation._KNOWN_VALUE_LEN_MAX + 1)
    assert validation.validate_request([*REQUEST, (b"x-long", long)]) == -1
    assert long not in validation._good_values


def test_content_length_matching_the_data_is_accepted() -> None:
    peer = Peer()
    headers = [*REQUEST, (b"content-length", b"5")]
    assert peer.headers(1, headers) == [HeadersReceived(1, headers, False, False)]
    assert peer.feed(fr.data(1, b"ab")) == [DataReceived(1, b"ab", False)]
    assert peer.feed(fr.data(1, b"cde", end_stream=True)) == [DataReceived(1, b"cde", True)]


def test_content_length_exceeded_by_data_resets() -> None:
    peer = Peer()
    peer.headers(1, [*REQUEST, (b"content-length", b"5")])
    assert peer.feed(fr.data(1, b"abcdef")) == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]


def test_content_length_short_at_end_stream_resets() -> None:
    peer = Peer()
    peer.headers(1, [*REQUEST, (b"content-length", b"5")])
    assert peer.feed(fr.data(1, b"abc", end_stream=True)) == [
        StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)
    ]


def test_content_length_short_at_trailers_resets() -> None:
    peer = Peer()
    peer.headers(1, [*REQUEST, (b"content-length", b"5")])
    peer.feed(fr.data(1, b"abc"))
    assert peer.headers(1, TRAILERS, end_stream=True) == [
        StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)
    ]


def test_content_length_with_headers_only_request_resets() -> None:
    peer = Peer()
    assert peer.headers(1, [*REQUEST, (b"content-length", b"5")], end_stream=True) == []
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]


@pytest.mark.parametrize(
    ("trailers", "end_stream"),
    [
        ([(b"grpc-status", b"0")], False),  # trailers must end the stream
        ([(b":path", b"/x")], True),
        ([(b"Grpc-Status", b"0")], True),
    ],
    ids=["no END_STREAM", "pseudo-header", "uppercase"],
)
def test_bad_request_trailers_reset(trailers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
    peer = Peer()
    open_request(peer)
    assert peer.headers(1, trailers, end_stream) == [
        StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)
    ]
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"application/grpc")],  # no :status
        [(b"content-type", b"application/grpc"), (b":status", b"200")],  # :status not first
        [(b":status", b"200"), (b":path", b"/")],  # a request pseudo-header
        [(b":status", b"200"), (b"connection", b"close")],
        [(b":status", b"200"), (b"transfer-encoding", b"chunked")],
    ],
)
def test_bad_response_resets_the_client_stream(headers: list[tuple[bytes, bytes]]) -> None:
    peer = Peer(Role.CLIENT)
    sid = peer.conn.open_stream(REQUEST, end_stream=True)
    peer.out()
    assert peer.headers(sid, headers) == [StreamReset(sid, ErrorCode.PROTOCOL_ERROR, False)]
    assert peer.out() == [rst(sid, ErrorCode.PROTOCOL_ERROR)]


def test_bad_response_trailers_reset_the_client_stream() -> None:
    peer = Peer(Role.CLIENT)
    sid = peer.conn.open_stream(REQUEST, end_stream=True)
    peer.headers(sid, RESPONSE)
    peer.out()
    assert peer.headers(sid, [(b":status", b"200")], end_stream=True) == [
        StreamReset(sid, ErrorCode.PROTOCOL_ERROR, False)
    ]


# ---------------------------------------------------------------------------- abuse limits


def _pings_until_trip(peer: Peer, most: int) -> int:
    for n in range(1, most + 1):
        try:
            peer.feed(fr.ping(OPAQUE))
        except FloodError as exc:
            assert (exc.limit, exc.code) == ("ping", ErrorCode.ENHANCE_YOUR_CALM)
            return n
    raise AssertionError(f"{most} PINGs did not trip the limit")


def test_ping_flood_without_traffic_trips() -> None:
    # The first 100 pings since our last HEADERS/DATA are free; past those the rate counts.
    peer = Peer()
    tripped_at = _pings_until_trip(peer, 10_000)
    assert 100 < tripped_at <= 201
    assert len(peer.out()) == tripped_at - 1  # every ping before the trip was answered


def test_pings_while_we_send_data_are_not_a_flood() -> None:
    # gRPC's BDP estimator pings on every burst of data it receives.
    peer = Peer()
    open_request(peer, end_stream=True)
    respond(peer)
    for _ in range(50):
        assert peer.feed(fr.ping(OPAQUE) * 100) == []
        assert peer.conn.send_data(1, b"burst") == 5
    assert len(peer.out()) == 50 * 101


def test_ping_rate_is_per_second() -> None:
    peer = Peer()
    assert peer.feed(fr.ping(OPAQUE) * 100) == []
    for _ in range(5):
        assert peer.feed(fr.ping(OPAQUE) * 100) == []
        peer.clock.advance(1.0)
    assert len(peer.out()) == 600


def test_client_role_has_no_flood_limits() -> None:
    # Flood limits guard the proxy from clients; a backend connection does not trip them.
    peer = Peer(Role.CLIENT)
    data = fr.ping(OPAQUE) * 1000 + fr.settings({}) * 1000 + fr.priority(2, 0) * 1000
    assert peer.feed(data) == []
    assert len(peer.out()) == 2000


def test_ping_acks_are_not_counted() -> None:
    peer = Peer()
    events = peer.feed(fr.ping(OPAQUE, ack=True) * 500)
    assert events == [PingAcked(OPAQUE)] * 500


def test_settings_flood() -> None:
    peer = Peer()  # the handshake's SETTINGS counts: 99 more are fine
    assert peer.feed(fr.settings({}) * 99) == []
    with pytest.raises(FloodError) as info:
        peer.feed(fr.settings({}))
    assert (info.value.limit, info.value.code) == ("settings", ErrorCode.ENHANCE_YOUR_CALM)


def test_empty_data_flood() -> None:
    peer = Peer()
    open_request(peer)
    assert peer.feed(fr.data(1, b"") * 100) == [DataReceived(1, b"", False)] * 100
    with pytest.raises(FloodError) as info:
        peer.feed(fr.data(1, b""))
    assert (info.value.limit, info.value.code) == ("empty_frames", ErrorCode.ENHANCE_YOUR_CALM)


def test_empty_data_with_end_stream_is_not_counted() -> None:
    peer = Peer()
    for sid in range(1, 400, 2):
        open_request(peer, sid)
        assert peer.feed(fr.data(sid, b"", end_stream=True)) == [DataReceived(sid, b"", True)]


def test_priority_flood() -> None:
    peer = Peer()
    assert peer.feed(fr.priority(1, 0) * 100) == []
    with pytest.raises(FloodError) as info:
        peer.feed(fr.priority(1, 0))
    assert (info.value.limit, info.value.code) == ("empty_frames", ErrorCode.ENHANCE_YOUR_CALM)


def test_rapid_reset_flood() -> None:
    peer = Peer()
    first = peer.block(REQUEST)
    block = peer.block(REQUEST)  # from now on: all indexed
    burst = b"".join(
        fr.headers(sid, first if sid == 1 else block) + fr.rst_stream(sid, ErrorCode.CANCEL)
        for sid in range(1, 1001, 2)
    )
    events = peer.feed(burst)
    assert len(events) == 1000  # 500 HeadersReceived + 500 StreamReset
    with pytest.raises(FloodError) as info:
        peer.feed(fr.headers(1001, block) + fr.rst_stream(1001, ErrorCode.CANCEL))
    assert (info.value.limit, info.value.code) == ("rapid_reset", ErrorCode.ENHANCE_YOUR_CALM)


def test_resets_after_the_response_started_are_not_rapid_resets() -> None:
    peer = Peer()
    for sid in range(1, 2001, 2):
        peer.headers(sid, REQUEST)
        peer.conn.send_headers(sid, RESPONSE, False)
        assert peer.feed(fr.rst_stream(sid, ErrorCode.CANCEL)) == [
            StreamReset(sid, ErrorCode.CANCEL, True)
        ]


def test_queued_control_frames_limit_while_the_peer_does_not_read() -> None:
    limits = Limits(max_queued_control_frames=10, max_pings_per_s=10_000)
    peer = Peer(limits=limits)
    peer.conn.pause_writing()
    assert peer.feed(fr.ping(OPAQUE) * 10) == []
    with pytest.raises(FloodError) as info:
        peer.feed(fr.ping(OPAQUE))
    assert (info.value.limit, info.value.code) == (
        "queued_control_frames",
        ErrorCode.ENHANCE_YOUR_CALM,
    )


def test_queued_control_frames_count_restarts_when_writing_resumes() -> None:
    peer = Peer(limits=Limits(max_queued_control_frames=10, max_pings_per_s=10_000))
    for _ in range(5):
        peer.conn.pause_writing()
        assert peer.feed(fr.ping(OPAQUE) * 10) == []
        assert peer.conn.resume_writing() == []
    assert len(peer.out()) == 50
    assert peer.feed(fr.ping(OPAQUE) * 100) == []  # not paused: not counted


def test_queued_control_frames_count_stream_resets() -> None:
    peer = Peer(limits=Limits(max_queued_control_frames=10))
    peer.conn.pause_writing()
    bad = [*REQUEST, (b"X-Upper", b"1")]
    for sid in range(1, 21, 2):
        assert peer.headers(sid, bad) == []
    with pytest.raises(FloodError) as info:
        peer.headers(21, bad)
    assert info.value.limit == "queued_control_frames"


def _header_list_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(n) + len(v) + 32 for n, v in headers)


def test_header_list_size_limit_is_exact() -> None:
    limits = Limits(max_header_list_size=1000)
    fill = 1000 - _header_list_size(REQUEST) - 32 - len(b"x-fill")
    ok = [*REQUEST, (b"x-fill", b"f" * fill)]
    assert _header_list_size(ok) == 1000
    peer = Peer(limits=limits)
    assert peer.headers(1, ok) == [HeadersReceived(1, ok, False, False)]
    with pytest.raises(FloodError) as info:
        peer.headers(3, [*REQUEST, (b"x-fill", b"f" * (fill + 1))])
    assert (info.value.limit, info.value.code) == ("header_list_size", ErrorCode.ENHANCE_YOUR_CALM)


def test_one_huge_header() -> None:
    peer = Peer()
    headers = [*REQUEST, (b"x-huge", b"h" * (64 * KiB))]
    with pytest.raises(FloodError) as info:
        peer.feed(fr.headers(1, peer.encoder.encode(headers, huffman=False)))
    assert info.value.limit == "header_list_size"


def test_many_small_headers_hpack_bomb() -> None:
    # One dynamic-table entry referenced 2,000 times: a 2 KB block that inflates to 80 KB.
    peer = Peer()
    first = peer.block([*REQUEST, (b"x-bomb", b"b")])
    assert peer.feed(fr.headers(1, first)) == [
        HeadersReceived(1, [*REQUEST, (b"x-bomb", b"b")], False, False)
    ]
    bomb = peer.block(REQUEST) + b"\xbe" * 2000
    assert len(bomb) < 16_384
    with pytest.raises(FloodError) as info:
        peer.feed(fr.headers(3, bomb))
    assert info.value.limit == "header_list_size"


# ---------------------------------------------------------------------------- h2 interop


def _h2(client_side: bool) -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    return conn


def _exchange(ours: Connection, theirs: h2.connection.H2Connection) -> tuple[list, list]:
    """Pump until quiet; ours acknowledges DATA like the relay, theirs as an app would."""
    our_events: list[Event] = []
    their_events: list[h2.events.Event] = []
    for _ in range(10_000):
        a, b = ours.data_to_send(), theirs.data_to_send()
        if not a and not b:
            return our_events, their_events
        if a:
            got = theirs.receive_data(a)
            their_events += got
            for ev in got:
                if isinstance(ev, h2.events.DataReceived):
                    theirs.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        if b:
            got_ours = ours.receive_data(b)
            our_events += got_ours
            for ev in got_ours:
                if isinstance(ev, DataReceived) and ev.data:
                    ours.ack_data(ev.stream_id, len(ev.data))
    raise AssertionError("never quiet")


def _h2_send_all(conn: h2.connection.H2Connection, sid: int, data: bytes) -> bytes:
    """Send what h2's flow control allows now; return the rest."""
    n = min(len(data), conn.local_flow_control_window(sid))
    size = conn.max_outbound_frame_size
    for i in range(0, n, size):
        conn.send_data(sid, data[i : min(i + size, n)])
    return data[n:]


def test_interop_h2_client_to_our_server() -> None:
    client = _h2(client_side=True)
    server = Connection(Role.SERVER)
    body = bytes(range(256)) * 2000  # 512,000 bytes: several windows' worth
    response = b"r" * 700_000
    client.send_headers(1, REQUEST)
    our_events, _ = _exchange(server, client)
    assert our_events == [SettingsChanged(100), HeadersReceived(1, REQUEST, False, False)]

    received = bytearray()
    rest = body
    while True:
        rest = _h2_send_all(client, 1, rest)
        if not rest:
            client.end_stream(1)
        our_events, _ = _exchange(server, client)
        for ev in our_events:
            assert isinstance(ev, DataReceived), ev
            received += ev.data
        if not rest:
            assert our_events[-1].end_stream
            break
    assert bytes(received) == body

    server.send_headers(1, RESPONSE, False)
    server.send_data(1, response)
    server.send_headers(1, TRAILERS, True)
    got = bytearray()
    their_events: list = []
    for _ in range(100):
        our_events, new = _exchange(server, client)
        their_events += new
        if any(isinstance(e, h2.events.StreamEnded) for e in new):
            break
    else:
        raise AssertionError("response never ended")
    for ev in their_events:
        if isinstance(ev, h2.events.DataReceived):
            got += ev.data
    assert bytes(got) == response
    (resp,) = [e for e in their_events if isinstance(e, h2.events.ResponseReceived)]
    assert resp.headers == RESPONSE
    (trailers,) = [e for e in their_events if isinstance(e, h2.events.TrailersReceived)]
    assert trailers.headers == TRAILERS
    assert server.open_streams == 0


def test_interop_our_client_to_h2_server() -> None:
    server = _h2(client_side=False)
    client = Connection(Role.CLIENT)
    body = b"q" * 300_000
    sid = client.open_stream(REQUEST, end_stream=False)
    client.send_data(sid, body, end_stream=True)
    got = bytearray()
    seen: list[h2.events.Event] = []
    for _ in range(100):
        _, their_events = _exchange(client, server)
        seen += their_events
        if any(isinstance(e, h2.events.StreamEnded) for e in their_events):
            break
    else:
        raise AssertionError("request never ended")
    for ev in seen:
        if isinstance(ev, h2.events.DataReceived):
            got += ev.data
    assert bytes(got) == body
    (req,) = [e for e in seen if isinstance(e, h2.events.RequestReceived)]
    assert req.headers == REQUEST

    server.send_headers(sid, RESPONSE)
    reply = b"z" * 200_000
    rest = reply
    received = bytearray()
    events: list[Event] = []
    while True:
        rest = _h2_send_all(server, sid, rest)
        if not rest:
            server.send_headers(sid, TRAILERS, end_stream=True)
        our_events, _ = _exchange(client, server)
        events += our_events
        if not rest:
            break
    for ev in events:
        if isinstance(ev, DataReceived):
            received += ev.data
    assert bytes(received) == reply
    headers = [e for e in events if isinstance(e, HeadersReceived)]
    assert headers == [
        HeadersReceived(sid, RESPONSE, False, False),
        HeadersReceived(sid, TRAILERS, True, True),
    ]
    assert client.open_streams == 0


def test_interop_h2_ping_and_settings() -> None:
    client = _h2(client_side=True)
    server = Connection(Role.SERVER)
    _exchange(server, client)
    client.ping(OPAQUE)
    client.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 3})
    our_events, their_events = _exchange(server, client)
    assert our_events == [SettingsChanged(3)]
    assert any(
        isinstance(e, h2.events.PingAckReceived) and e.ping_data == OPAQUE for e in their_events
    )
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in their_events)
    remote = client.remote_settings
    assert remote.max_concurrent_streams == 256
    assert remote.initial_window_size == 256 * KiB
    assert remote.max_header_list_size == 64 * KiB


# ---------------------------------------------------------------------------- fixed codec bugs
# Each test pins a bug found in review (window updates while paused, unbounded closed-stream
# memory, flood counters dodged by malformed frames, forbidden field characters, padding vs
# priority error codes).


def assert_trips(peer: Peer, data: bytes) -> None:
    try:
        peer.feed(data)
    except FloodError:
        return
    raise AssertionError(
        f"no flood limit tripped; the codec answered with {len(peer.out())} frames"
    )


def test_stream_window_update_does_not_write_while_paused() -> None:
    peer = Peer(settings={fr.SETTINGS_INITIAL_WINDOW_SIZE: 0})
    open_request(peer, end_stream=True)
    respond(peer)
    assert peer.conn.send_data(1, b"x" * 1000) == 0
    peer.conn.pause_writing()
    # A peer that does not read but keeps granting window must not make us write.
    assert peer.feed(fr.window_update(1, 1000)) == []
    assert peer.out() == []
    assert peer.conn.resume_writing() == [DataFlushed(1, 1000)]


def test_recently_closed_streams_stay_bounded() -> None:
    peer = Peer()
    peer.headers(1, [*REQUEST, (b"X-Upper", b"1")])
    bad = peer.block([*REQUEST, (b"X-Upper", b"1")])  # all indexed from now on
    assert peer.feed(b"".join(fr.headers(sid, bad) for sid in range(3, 20_001, 2))) == []
    assert peer.out() == [rst(sid, ErrorCode.PROTOCOL_ERROR) for sid in range(1, 20_001, 2)]
    remembered = len(peer.conn._recently_closed) + len(peer.conn._closed_before)
    assert 0 < remembered <= _RECENTLY_CLOSED_MAX
    # The latest are still known as reset by us (their late frames are ignored); the first,
    # forgotten, is a closed stream like any other.
    newest, older = 19_999, 19_999 - 2 * 300  # the second in the older generation
    assert older in peer.conn._closed_before
    for sid in (newest, older):
        assert peer.feed(fr.data(sid, b"late")) == []
        assert peer.out() == []
    assert peer.feed(fr.data(1, b"late")) == []
    assert peer.out() == [rst(1, ErrorCode.STREAM_CLOSED)]


def test_malformed_priority_frames_count_toward_the_flood_limit() -> None:
    peer = Peer()
    assert_trips(peer, fr.frame(fr.PRIORITY, 0, 1, b"") * 1000)


def test_empty_data_on_closed_streams_counts_toward_the_flood_limit() -> None:
    peer = Peer()
    open_request(peer)
    peer.feed(fr.rst_stream(1, ErrorCode.CANCEL))
    assert_trips(peer, fr.data(1, b"") * 1000)


def test_headers_padding_too_long_with_priority_is_a_protocol_error() -> None:
    # 1 (pad length) + 5 (priority) = 6 bytes present: the frame holds its mandatory fields,
    # only the padding (5) exceeds what remains (0).
    payload = b"\x05" + struct.pack(">IB", 0, 15)
    data = _hdr(EH | fr.FLAG_PADDED | fr.FLAG_PRIORITY, 1, payload)
    assert conn_error(Peer(), data).code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "field",
    [
        (b"x-smuggle", b"a\r\nx-injected: 1"),
        (b"x-nul", b"a\x00b"),
        (b"x-space", b" leading"),
        (b"x bad", b"1"),
        (b"x:colon", b"1"),
        (b"", b"empty-name"),
    ],
    ids=["CRLF in value", "NUL in value", "leading space", "space in name", "colon", "empty"],
)
def test_request_with_forbidden_field_characters_is_reset(field: tuple[bytes, bytes]) -> None:
    peer = Peer()
    assert peer.headers(1, [*REQUEST, field]) == []
    assert peer.out() == [rst(1, ErrorCode.PROTOCOL_ERROR)]
