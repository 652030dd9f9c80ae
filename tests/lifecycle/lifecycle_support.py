"""Helpers for the drain and worker tests: the admin endpoint, gRPC calls on their own
connections, a raw HTTP/2 client (tests/abuse/rawclient.py) with HPACK decoding of what comes
back, and waiting on a proxy process."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from backends import CHANNEL_OPTIONS
from hpack import Decoder
from proxy_process import proxy_output

from proxy.core.h2 import frames as fr
from proxy_examples.echo import echo_pb2, echo_pb2_grpc
from proxy_examples.echo.server import EchoServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "abuse"))
from rawclient import Frame, RawH2Client, request_headers

__all__ = ["Frame", "RawH2Client", "request_headers"]

MAX_STREAM_ID = 0x7FFF_FFFF
T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll until `check` returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- processes


def wait_for_log(proc: subprocess.Popen[bytes], text: str, timeout: float = 10.0) -> None:
    eventually(lambda: text in proxy_output(proc), timeout, f"{text!r} in the proxy's output")


def exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The exit code, failing (with the output) if it takes longer than `timeout`."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the proxy did not exit within {timeout}s\n{proxy_output(proc)}"
        ) from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it serves nothing.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# ---------------------------------------------------------------------------- admin


def admin_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def admin_pool(port: int) -> list[dict[str, Any]]:
    status, body = admin_get(port, "/pool")
    assert status == 200, body
    workers: list[dict[str, Any]] = json.loads(body)["workers"]
    return workers


def wait_ready(port: int, timeout: float = 30.0) -> str:
    def ready() -> str | None:
        try:
            status, body = admin_get(port, "/readyz")
        except OSError:
            return None
        return body if status == 200 else None

    return eventually(ready, timeout, "/readyz to answer 200")


def samples(metrics: str, name: str) -> dict[str, float]:
    """`{labels text: value}` of one metric's samples, e.g. {'{worker="0"}': 1.0}."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line[len(name) :].rpartition(" ")
            found[key] = float(value)
    return found


# ---------------------------------------------------------------------------- gRPC


def own_channel(port: int) -> grpc.Channel:
    """A channel with a connection of its own (grpcio shares connections between channels to
    one target unless told not to), so that each lands where the kernel puts it."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def stub(channel: grpc.Channel) -> echo_pb2_grpc.EchoStub:
    return echo_pb2_grpc.EchoStub(channel)


def slow_call_at_backend(channel: grpc.Channel, backend: EchoServer) -> grpc.Future:
    """A unary call the backend holds for 30 s, once the backend has it (and not before)."""
    call = stub(channel).UnaryEcho.future(
        echo_pb2.EchoRequest(message="slow"), metadata=[("x-echo-delay-ms", "30000")]
    )
    eventually(lambda: backend.servicer.calls >= 1, 10, "the call at the backend")
    return call


def unary_on_new_connection(port: int, message: str = "hi") -> str:
    with own_channel(port) as channel:
        reply = stub(channel).UnaryEcho(echo_pb2.EchoRequest(message=message), timeout=10)
    return str(reply.message)


# ---------------------------------------------------------------------------- raw HTTP/2

UNARY_PATH = "/echo.Echo/UnaryEcho"


def grpc_message(message: str) -> bytes:
    body = echo_pb2.EchoRequest(message=message).SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def send_unary(client: RawH2Client, sid: int, message: str, delay_ms: int = 0) -> None:
    extra = [("x-echo-delay-ms", str(delay_ms))] if delay_ms else []
    client.send(
        client.headers_frame(sid, request_headers(UNARY_PATH, extra))
        + fr.data(sid, grpc_message(message), end_stream=True)
    )


def goaways(client: RawH2Client) -> list[tuple[int, int]]:
    """(last stream id, error code) of every GOAWAY read so far."""
    return [
        (struct.unpack_from(">I", f.payload)[0] & MAX_STREAM_ID, f.error_code())
        for f in client.frames
        if f.kind == fr.GOAWAY
    ]


def wait_for_goaways(client: RawH2Client, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(goaways(client)) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"expected {count} GOAWAYs, got {goaways(client)}")
        _read_some(client, left)


def _read_some(client: RawH2Client, timeout: float) -> None:
    before = len(client.frames)
    deadline = time.monotonic() + timeout
    while len(client.frames) == before and time.monotonic() < deadline:
        if not client._read_once(min(deadline, time.monotonic() + 0.2)) and client.eof:
            raise AssertionError(f"connection closed; GOAWAYs so far {goaways(client)}")


def header_blocks(client: RawH2Client) -> dict[int, list[dict[str, str]]]:
    """Every stream's header blocks read so far (response headers, then trailers), decoded in
    order with one HPACK decoder as the connection requires."""
    decoder = Decoder()
    blocks: dict[int, list[dict[str, str]]] = {}
    for f in client.frames:
        if f.kind != fr.HEADERS:
            continue
        assert f.flags & fr.FLAG_END_HEADERS, "CONTINUATION not expected for these small blocks"
        payload = f.payload
        if f.flags & fr.FLAG_PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        if f.flags & fr.FLAG_PRIORITY:
            payload = payload[5:]
        decoded = decoder.decode(payload, raw=True)
        blocks.setdefault(f.stream_id, []).append({k.decode(): v.decode() for k, v in decoded})
    return blocks


def grpc_status(client: RawH2Client, sid: int, timeout: float = 10.0) -> str:
    """The grpc-status this stream ended with (waits for its END_STREAM HEADERS)."""
    client.wait_for(
        fr.HEADERS, timeout, stream_id=sid, flags=fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM
    )
    return header_blocks(client)[sid][-1]["grpc-status"]


def data_of(client: RawH2Client, sid: int) -> bytes:
    return b"".join(f.payload for f in client.frames if f.kind == fr.DATA and f.stream_id == sid)
