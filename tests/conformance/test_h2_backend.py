"""Self-test of the h2 backend that the h2spec conformance test puts behind the proxy.

Needs no external tool: an ``h2`` client over a plain socket checks that the backend
answers any request after END_STREAM and honours tiny flow-control windows.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2_backend import BODY, running_backend


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    with running_backend() as port:
        yield port


class Client:
    def __init__(self, port: int, initial_window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        if initial_window is not None:
            self.conn.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window}
            )
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def events(self) -> list[h2.events.Event]:
        data = self.sock.recv(65536)
        assert data, "backend closed the connection"
        events = self.conn.receive_data(data)
        self.flush()
        return events

    def close(self) -> None:
        self.conn.close_connection()
        self.flush()
        self.sock.close()


def request(
    client: Client,
    method: bytes,
    body: bytes = b"",
    trailers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[dict[bytes, bytes], bytes, list[int]]:
    """Send one request; return the response headers, body and DATA frame sizes."""
    stream_id = client.conn.get_next_available_stream_id()
    headers = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"localhost"),
        (b":path", b"/any"),
    ]
    end_after_headers = not body and not trailers
    client.conn.send_headers(stream_id, headers, end_stream=end_after_headers)
    offset = 0
    while offset < len(body):  # within the backend's windows: it must hand them back
        size = min(
            client.conn.local_flow_control_window(stream_id),
            client.conn.max_outbound_frame_size,
            len(body) - offset,
        )
        if size == 0:
            client.flush()
            client.events()  # wait for WINDOW_UPDATE
            continue
        offset += size
        last = offset == len(body)
        client.conn.send_data(
            stream_id, body[offset - size : offset], end_stream=last and not trailers
        )
    if trailers:
        client.conn.send_headers(stream_id, trailers, end_stream=True)
    client.flush()

    response: dict[bytes, bytes] = {}
    data = b""
    frames: list[int] = []
    while True:
        for event in client.events():
            if isinstance(event, h2.events.ResponseReceived):
                response = dict(event.headers or [])
            elif isinstance(event, h2.events.DataReceived):
                assert event.data is not None
                data += event.data
                frames.append(len(event.data))
                client.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                client.flush()
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                return response, data, frames
            elif isinstance(event, h2.events.StreamReset):
                pytest.fail(f"backend reset the stream: {event}")


@pytest.mark.parametrize(
    ("method", "body", "trailers"),
    [
        (b"GET", b"", None),
        (b"POST", b"x" * 100_000, None),
        (b"POST", b"payload", [(b"grpc-status", b"0")]),
    ],
)
def test_answers_any_request(
    backend_port: int, method: bytes, body: bytes, trailers: list[tuple[bytes, bytes]] | None
) -> None:
    client = Client(backend_port)
    try:
        headers, data, _ = request(client, method, body, trailers)
    finally:
        client.close()
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"text/plain"
    assert data == BODY


def test_head_has_no_body(backend_port: int) -> None:
    client = Client(backend_port)
    try:
        headers, data, _ = request(client, b"HEAD")
    finally:
        client.close()
    assert headers[b":status"] == b"200"
    assert data == b""


def test_respects_a_one_byte_window(backend_port: int) -> None:
    client = Client(backend_port, initial_window=1)
    try:
        _, data, frames = request(client, b"GET")
    finally:
        client.close()
    assert data == BODY
    assert frames == [1] * len(BODY)
