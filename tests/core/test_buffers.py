"""The buffer budget (proxy.core.buffers) and the codec's count of what its queues hold."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from proxy.core.buffers import BufferMeter, ConnectionBuffer
from proxy.core.h2 import frames as fr
from proxy.core.h2.connection import Connection, Role
from proxy.core.h2.events import HeadersReceived

KiB = 1024


def test_a_connection_gets_grants_until_its_cap_counting_what_it_queues() -> None:
    meter = BufferMeter(budget=1024 * KiB)
    conn = ConnectionBuffer(meter, cap=100 * KiB)
    assert conn.grant(40 * KiB, queued=0) == 40 * KiB
    assert conn.grant(40 * KiB, queued=10 * KiB) == 40 * KiB
    # 80 granted + 10 queued: 10 left under the cap
    assert conn.grant(40 * KiB, queued=10 * KiB) == 10 * KiB
    assert conn.grant(40 * KiB, queued=10 * KiB) == 0
    assert (conn.granted, meter.granted) == (90 * KiB, 90 * KiB)
    conn.release(40 * KiB)
    assert (conn.granted, meter.granted) == (50 * KiB, 50 * KiB)
    assert conn.grant(40 * KiB, queued=10 * KiB) == 40 * KiB


def test_the_process_budget_bounds_every_connection_together() -> None:
    meter = BufferMeter(budget=100 * KiB)
    a, b = ConnectionBuffer(meter, cap=80 * KiB), ConnectionBuffer(meter, cap=80 * KiB)
    assert a.grant(60 * KiB, queued=0) == 60 * KiB
    meter.queued = 20 * KiB  # what the codecs hold, over all connections
    assert b.grant(60 * KiB, queued=0) == 20 * KiB
    assert b.grant(60 * KiB, queued=0) == 0
    assert meter.used == 100 * KiB and not meter.over()
    assert meter.refusing()  # past 90 %: new streams are refused
    meter.queued += 1
    assert meter.over()
    a.release(60 * KiB)
    assert not meter.refusing()


def _server_with_stream(meter: BufferMeter) -> tuple[Connection, h2.connection.H2Connection, int]:
    """Our server-role codec with a client (the h2 library) that opened one stream and
    gives it no window beyond the initial 65,535 bytes."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    sid = client.get_next_available_stream_id()
    client.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/echo.Echo/UnaryEcho"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    server = Connection(Role.SERVER, meter=meter)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(ev, HeadersReceived) for ev in events)
    client.receive_data(server.data_to_send())
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")], False)
    return server, client, sid


def test_the_codec_counts_queued_data_until_it_is_sent() -> None:
    meter = BufferMeter()
    server, client, sid = _server_with_stream(meter)
    sent = server.send_data(sid, b"x" * (100 * KiB))
    assert sent == 65_535  # the client's initial window
    assert server.queued == meter.queued == 100 * KiB - 65_535
    # The client reads and opens its windows: the rest goes out and leaves the count.
    client.receive_data(server.data_to_send())
    client.increment_flow_control_window(100 * KiB, stream_id=sid)
    client.increment_flow_control_window(100 * KiB)
    server.receive_data(client.data_to_send())
    assert server.queued == meter.queued == 0


def test_bytes_queued_over_the_budget_ask_for_a_shed_at_once() -> None:
    """Streams opened before the budget filled still receive their base windows: queued
    over the budget, those bytes call `on_over` (the listener sheds at the loop turn's end)
    without waiting for a grant to be refused or for the next sweep."""
    meter = BufferMeter(budget=20 * KiB)
    calls: list[int] = []
    meter.on_over = lambda: calls.append(meter.queued)
    server, _client, sid = _server_with_stream(meter)
    server.send_data(sid, b"x" * (65_535 + 10 * KiB))  # 10 KiB queued: under the budget
    assert calls == []
    server.send_data(sid, b"y" * (20 * KiB))  # 30 KiB queued: over it
    assert calls == [30 * KiB]


def test_a_reset_or_a_lost_connection_frees_the_count() -> None:
    meter = BufferMeter()
    server, _client, sid = _server_with_stream(meter)
    server.send_data(sid, b"x" * (100 * KiB))
    assert meter.queued > 0
    server.reset_stream(sid)
    assert server.queued == meter.queued == 0

    server2, _client2, sid2 = _server_with_stream(meter)
    server2.send_data(sid2, b"y" * (80 * KiB))
    assert meter.queued == 80 * KiB - 65_535
    server2.discard_queued()
    assert server2.queued == meter.queued == 0


def test_grant_sends_a_window_update_for_the_stream() -> None:
    client = Connection(Role.CLIENT)
    sid = client.open_stream(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a"), (b":authority", b"x")],
        False,
    )
    client.data_to_send()
    client.grant(sid, 1000)
    out = bytearray(client.data_to_send())
    length, kind, _flags, stream = fr.parse_header(out, 0)
    assert (kind, stream, length) == (fr.WINDOW_UPDATE, sid, 4)
    assert int.from_bytes(out[fr.FRAME_HEADER_SIZE : fr.FRAME_HEADER_SIZE + 4], "big") == 1000
    assert client.streams[sid].recv_window == client.limits.stream_window + 1000
