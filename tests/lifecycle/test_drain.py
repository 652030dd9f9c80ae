"""Graceful drain of a real proxy process on SIGTERM: calls in flight finish, new connections
are refused, the two GOAWAYs carry the right ids, the exit code says how it went."""

from __future__ import annotations

import signal

import grpc
import pytest
from backends import EchoBackendsFactory
from lifecycle_support import (
    MAX_STREAM_ID,
    RawH2Client,
    connection_refused,
    data_of,
    exit_code,
    goaways,
    grpc_status,
    own_channel,
    send_unary,
    slow_call_at_backend,
    stub,
    wait_for_goaways,
    wait_for_log,
)
from proxy_process import log_events, proxy_output, start_proxy

from proxy.core.h2 import frames as fr
from proxy.core.h2.errors import ErrorCode
from proxy.runtime.downstream import DRAIN_PING
from proxy_examples.echo import echo_pb2


def serve_args(backend: str, *extra: str) -> list[str]:
    return ["serve", "--backend", backend, "--admin", "off", *extra]


def test_stream_in_flight_finishes_new_connections_refused_exit_0(
    echo_backends: EchoBackendsFactory,
) -> None:
    (backend,) = echo_backends(1)
    with start_proxy(serve_args(backend.address)) as (proc, port), own_channel(port) as channel:
        # 11 messages 500 ms apart: a 5-second stream.
        responses = stub(channel).ServerStreamingEcho(
            echo_pb2.EchoRequest(message="tick", count=11),
            metadata=[("x-echo-interval-ms", "500")],
            timeout=60,
        )
        assert next(responses).message == "tick"  # the stream is in flight
        proc.send_signal(signal.SIGTERM)
        wait_for_log(proc, "draining")

        assert connection_refused(port)
        with own_channel(port) as late, pytest.raises(grpc.RpcError) as refused:
            stub(late).UnaryEcho(echo_pb2.EchoRequest(message="late"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        rest = [r.message for r in responses]
        assert rest == ["tick"] * 10
        assert responses.code() == grpc.StatusCode.OK
        assert exit_code(proc, 20) == 0


def test_two_goaways_and_streams_around_them(echo_backends: EchoBackendsFactory) -> None:
    """First GOAWAY 2^31-1 + PING; a stream opened before the PING ack is served; the final
    GOAWAY names it; a stream opened after that is refused."""
    (backend,) = echo_backends(1)
    with start_proxy(serve_args(backend.address)) as (proc, port), RawH2Client(port) as client:
        client.handshake()
        send_unary(client, 1, "slow", delay_ms=2500)
        client.wait_for(fr.HEADERS, stream_id=1)  # the backend has the call
        proc.send_signal(signal.SIGTERM)

        wait_for_goaways(client, 1)
        assert goaways(client) == [(MAX_STREAM_ID, ErrorCode.NO_ERROR)]
        ping = client.wait_for(fr.PING, flags=0)
        assert ping.payload == DRAIN_PING

        send_unary(client, 3, "between")  # sent before the ack: must be served
        client.send(fr.ping(ping.payload, ack=True))
        wait_for_goaways(client, 2)
        assert goaways(client)[1] == (3, ErrorCode.NO_ERROR)

        send_unary(client, 5, "too late")
        assert client.wait_for(fr.RST_STREAM, stream_id=5).error_code() == (
            ErrorCode.REFUSED_STREAM
        )

        assert grpc_status(client, 3) == "0"
        assert b"between" in data_of(client, 3)
        assert grpc_status(client, 1) == "0"
        assert b"slow" in data_of(client, 1)
        assert not data_of(client, 5)
        assert client.wait_for_eof(10), "the proxy closes the connection once it is idle"
        assert exit_code(proc, 20) == 0


def test_final_goaway_follows_without_a_ping_ack(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    with start_proxy(serve_args(backend.address)) as (proc, port), RawH2Client(port) as client:
        client.handshake()
        send_unary(client, 1, "slow", delay_ms=2500)
        client.wait_for(fr.HEADERS, stream_id=1)
        proc.send_signal(signal.SIGTERM)
        wait_for_goaways(client, 2)  # no PING ack from us: the proxy's timer sends it
        assert goaways(client) == [(MAX_STREAM_ID, 0), (1, 0)]
        assert grpc_status(client, 1) == "0"
        assert client.wait_for_eof(10)
        assert exit_code(proc, 20) == 0


def test_idle_connection_does_not_hold_the_drain(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    args = serve_args(backend.address, "--drain-timeout", "60")
    with start_proxy(args) as (proc, port), RawH2Client(port) as client:
        client.handshake()
        client.server_settings()
        proc.send_signal(signal.SIGTERM)
        ping = client.wait_for(fr.PING, flags=0)
        client.send(fr.ping(ping.payload, ack=True))
        assert client.wait_for_eof(10)
        assert goaways(client) == [(MAX_STREAM_ID, 0), (0, 0)]
        # Nowhere near the 60 s drain timeout: nothing was in flight.
        assert exit_code(proc, 20) == 0


def test_second_signal_exits_at_once(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    args = serve_args(backend.address, "--drain-timeout", "60")
    with start_proxy(args) as (proc, port), own_channel(port) as channel:
        call = slow_call_at_backend(channel, backend)
        proc.send_signal(signal.SIGTERM)
        wait_for_log(proc, "draining")
        proc.send_signal(signal.SIGINT)
        assert exit_code(proc, 10) == 1  # not the 30 s of the call, nor the 60 s of the drain
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
        assert "exit_now" in proxy_output(proc)


def test_drain_timeout_ends_the_call_with_unavailable(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    args = serve_args(backend.address, "--drain-timeout", "1")
    with start_proxy(args) as (proc, port), own_channel(port) as channel:
        call = slow_call_at_backend(channel, backend)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            call.result(timeout=15)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "proxy shutting down" in (ended.value.details() or "")
        assert exit_code(proc, 15) == 0
        # The backend was told too: its call was cancelled, not left to run.
        assert backend.wait_for_cancelled(1, timeout=10)
        # Its access log line was written before the exit (accounting waits for the end of
        # a loop turn: the shutdown must not drop it).
        statuses = [line["grpc_status"] for line in log_events(proc, "call")]
        assert statuses == [grpc.StatusCode.UNAVAILABLE.value[0]], proxy_output(proc)


def test_response_stuck_behind_flow_control_is_reset_at_the_timeout(
    echo_backends: EchoBackendsFactory,
) -> None:
    """A client that reads nothing (window 0) holds the response's DATA and trailers in the
    proxy; when the drain time is up that stream gets RST_STREAM(CANCEL), not silence."""
    (backend,) = echo_backends(1)
    args = serve_args(backend.address, "--drain-timeout", "1")
    with start_proxy(args) as (proc, port), RawH2Client(port) as client:
        client.handshake({fr.SETTINGS_INITIAL_WINDOW_SIZE: 0})
        send_unary(client, 1, "stuck")
        client.wait_for(fr.HEADERS, stream_id=1)  # response headers: not flow-controlled
        proc.send_signal(signal.SIGTERM)
        ping = client.wait_for(fr.PING, flags=0)
        client.send(fr.ping(ping.payload, ack=True))
        reset = client.wait_for(fr.RST_STREAM, timeout=10, stream_id=1)
        assert reset.error_code() == ErrorCode.CANCEL
        assert not data_of(client, 1)
        assert goaways(client) == [(MAX_STREAM_ID, 0), (1, 0)]
        assert exit_code(proc, 15) == 0
