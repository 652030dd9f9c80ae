"""Every abuse limit, end to end: a real proxy process in front of a real echo backend, frames
crafted over a raw socket. A tripped limit must end that connection alone with
GOAWAY(ENHANCE_YOUR_CALM) and a close, while a well-behaved grpcio client on its own channel
keeps succeeding during and right after.

The proxy logs the limit that tripped (``client_protocol_error ... limit='<name>'``); each
test checks the name, so a flood that trips some other limit first does not pass by accident.
Defaults (proxy/core/h2/limits.py): 100 pings/s (counted once 100 arrive with no traffic from us),
100 SETTINGS/s, 100 empty frames/s, 500 rapid resets/s, 1000 queued control frames,
32 CONTINUATION frames per block, 64 KiB of decoded headers, 256 concurrent streams.
"""

from __future__ import annotations

import time

from abuse_support import Bystander, BystanderFactory, ProxyFactory, RunningProxy
from rawclient import RawH2Client, request_headers

from proxy.core.h2 import frames as fr
from proxy.core.h2.errors import ErrorCode
from proxy_examples.echo import echo_pb2

ENHANCE_YOUR_CALM = 0xB
STREAMING_PATH = "/echo.Echo/ServerStreamingEcho"


def grpc_message(request: echo_pb2.EchoRequest) -> bytes:
    body = request.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def assert_calmed(client: RawH2Client, proxy: RunningProxy, limit: str, by: Bystander) -> None:
    """GOAWAY(ENHANCE_YOUR_CALM), then the proxy closes; the right limit tripped; the
    bystander's calls succeed right after the trip and keep succeeding."""
    goaway = client.find_goaway(timeout=10)
    assert goaway.error_code() == ENHANCE_YOUR_CALM, goaway
    assert client.wait_for_eof(timeout=10), "the proxy did not close the connection"
    proxy.wait_tripped(limit)
    by.calls_right_now()
    by.wait_for_calls(5)
    by.finish()


def test_default_settings_are_advertised(abuse_proxy: ProxyFactory) -> None:
    proxy = abuse_proxy()
    with RawH2Client(proxy.port) as client:
        client.handshake()
        settings = client.server_settings()
    assert settings[fr.SETTINGS_MAX_CONCURRENT_STREAMS] == 256
    assert settings[fr.SETTINGS_MAX_HEADER_LIST_SIZE] == 64 * 1024


def test_max_concurrent_streams_refuses_extra_streams(
    abuse_proxy: ProxyFactory, bystander: BystanderFactory
) -> None:
    proxy = abuse_proxy("--max-concurrent-streams", "4")
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        assert client.server_settings()[fr.SETTINGS_MAX_CONCURRENT_STREAMS] == 4
        # Four requests left open (no body yet), then a fifth: refused.
        client.send(
            b"".join(client.headers_frame(sid, request_headers()) for sid in (1, 3, 5, 7, 9))
        )
        refused = client.wait_for(fr.RST_STREAM, stream_id=9)
        assert refused.error_code() == ErrorCode.REFUSED_STREAM
        client.send(fr.ping(b"still-on"))
        client.wait_for(fr.PING, flags=fr.FLAG_ACK)
        assert [f for f in client.frames if f.kind == fr.RST_STREAM and f.stream_id != 9] == []
        # Free a slot; the next stream is served (its response HEADERS come back).
        client.send(fr.rst_stream(1, ErrorCode.CANCEL))
        request = grpc_message(echo_pb2.EchoRequest(message="fits"))
        client.send(client.headers_frame(11, request_headers()) + fr.data(11, request, True))
        client.wait_for(fr.HEADERS, stream_id=11)
        assert not client.eof
    by.calls_right_now()
    by.finish()


def test_one_huge_header(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        headers = request_headers(extra=[("x-huge", "h" * (70 * 1024))])
        block = client.block(headers, huffman=False)  # 70 KiB: HEADERS + 4 CONTINUATION
        client.send(fr.headers(1, block))
        assert_calmed(client, proxy, "header_list_size", by)


def test_many_headers(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        extra = [(f"x-h-{i:04d}", "v") for i in range(3000)]  # ~123 KB decoded
        client.send(fr.headers(1, client.block(request_headers(extra=extra))))
        assert_calmed(client, proxy, "header_list_size", by)


def test_hpack_bomb(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        first = client.block(request_headers(extra=[("x-bomb", "b" * 100)]))
        # One dynamic entry referenced 4,000 times: 4 KB that decode to 540 KB.
        bomb = client.block(request_headers()) + b"\xbe" * 4000
        client.send(fr.headers(1, first) + fr.headers(3, bomb))
        assert_calmed(client, proxy, "header_list_size", by)


def test_continuation_flood(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        block = client.block(request_headers())
        flood = fr.frame(fr.HEADERS, 0, 1, block[:4])
        flood += fr.frame(fr.CONTINUATION, 0, 1, block[4:])
        flood += fr.frame(fr.CONTINUATION, 0, 1, b"") * 200  # never END_HEADERS
        client.send(flood)
        assert_calmed(client, proxy, "continuation_frames", by)


def test_rapid_reset(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        first = client.headers_frame(1, request_headers())
        block = client.block(request_headers())  # all indexed from here on
        burst = [first + fr.rst_stream(1, ErrorCode.CANCEL)]
        burst += [
            fr.headers(sid, block) + fr.rst_stream(sid, ErrorCode.CANCEL)
            for sid in range(3, 4001, 2)
        ]
        client.send(b"".join(burst))
        assert_calmed(client, proxy, "rapid_reset", by)


def test_ping_flood_from_a_client_that_does_not_read(
    abuse_proxy: ProxyFactory, bystander: BystanderFactory
) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port, rcvbuf=4096) as client:
        client.handshake()
        # Many PINGs and never a read while sending: the answers can only pile up.
        client.send(b"".join(fr.ping(i.to_bytes(8, "big")) for i in range(3000)))
        proxy.wait_tripped("ping")
        assert_calmed(client, proxy, "ping", by)
        acks = [f for f in client.frames if f.kind == fr.PING]
        assert 0 < len(acks) < 1000, "the proxy kept answering the flood"


def test_settings_flood(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        client.send(fr.settings({fr.SETTINGS_INITIAL_WINDOW_SIZE: 65_535}) * 2000)
        assert_calmed(client, proxy, "settings", by)


def test_empty_data_flood(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        client.send(client.headers_frame(1, request_headers()) + fr.data(1, b"") * 2000)
        assert_calmed(client, proxy, "empty_frames", by)


def test_priority_flood(abuse_proxy: ProxyFactory, bystander: BystanderFactory) -> None:
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port) as client:
        client.handshake()
        client.send(b"".join(fr.priority(sid, 0) for sid in range(1, 4001, 2)))
        assert_calmed(client, proxy, "empty_frames", by)
    assert "too many PRIORITY frames" in proxy.output()


def test_queued_control_frames_for_a_client_that_does_not_read(
    abuse_proxy: ProxyFactory, bystander: BystanderFactory
) -> None:
    """A client that stops reading while making the proxy answer: the answers are counted
    once the proxy's socket is backed up, and past the limit the connection is closed instead
    of buffered forever.

    PINGs cannot reach this limit at the defaults: the PING limit trips after ~200 answers,
    a few KB, long before the socket backs up. So the test first backs the socket up with a
    big streamed response it never reads, then sends malformed requests, each of which the
    proxy must answer with RST_STREAM (no rate limit applies to those)."""
    proxy = abuse_proxy()
    by = bystander(proxy)
    with RawH2Client(proxy.port, rcvbuf=4096) as client:
        big = fr.MAX_WINDOW
        client.handshake({fr.SETTINGS_INITIAL_WINDOW_SIZE: big})
        filler = grpc_message(echo_pb2.EchoRequest(message="f", payload=b"x" * 16_000, count=400))
        client.send(
            fr.window_update(0, big - fr.DEFAULT_WINDOW)
            + client.headers_frame(1, request_headers(STREAMING_PATH))
            + fr.data(1, filler, end_stream=True)
        )
        bad = request_headers(extra=[("X-Upper-Case", "1")])
        client.send(client.headers_frame(3, bad, end_stream=True))
        indexed = client.block(bad)  # the table holds it all now: a few bytes per request
        sent, sid, batch = 1, 5, 5000
        deadline = time.monotonic() + 30
        while not proxy.tripped("queued_control_frames"):
            assert time.monotonic() < deadline, f"not tripped after {sent} malformed requests"
            ids = range(sid, sid + 2 * batch, 2)
            client.send(b"".join(fr.headers(s, indexed, end_stream=True) for s in ids))
            sent += batch
            sid += 2 * batch
            time.sleep(0.05)
        # Only now read: the filler, the answers sent before the trip, then GOAWAY and EOF.
        assert_calmed(client, proxy, "queued_control_frames", by)
        answered = sum(1 for f in client.frames if f.kind == fr.RST_STREAM)
        assert answered < sent, "every malformed request was answered: nothing was refused"
