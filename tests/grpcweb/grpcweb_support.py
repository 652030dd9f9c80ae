"""Helpers for the gRPC-Web tests: request bodies, reading gRPC-Web responses, curl, and raw
HTTP/1.1 over a socket (for what curl hides: arrival times, keep-alive, pipelining, garbage).

Import as ``from grpcweb_support import ...`` (``tests/grpcweb`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools import require_tool

from proxy_examples.echo import echo_pb2
from proxy_examples.echo.server import EchoServer

ALLOWED_ORIGIN = "http://allowed.example"  # the origin the module's proxy allows (conftest)
UNARY = "/echo.Echo/UnaryEcho"
STREAM = "/echo.Echo/ServerStreamingEcho"
BINARY_CT = "application/grpc-web+proto"
TEXT_CT = "application/grpc-web-text"


@dataclass
class WebProxy:
    """The module's proxy process (the ``web_proxy`` fixture) and its backends."""

    port: int
    backends: list[EchoServer]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + struct.pack(">I", len(message)) + message


def echo_body(
    message: str = "hi", payload: bytes = b"", count: int = 0, text: bool = False
) -> bytes:
    """A request body: one EchoRequest frame (base64 in text mode)."""
    body = frame(
        echo_pb2.EchoRequest(message=message, payload=payload, count=count).SerializeToString()
    )
    return base64.b64encode(body) if text else body


@dataclass
class WebResponse:
    """A gRPC-Web response, decoded: its headers, messages and trailers (from the trailer
    frame, or from the headers of a trailers-only response)."""

    status: int
    headers: dict[str, str]
    messages: list[echo_pb2.EchoResponse] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_status(self) -> int:
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        assert value is not None, f"no grpc-status in {self.headers} or {self.trailers}"
        return int(value)

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))


def decode_body(body: bytes, text: bool) -> tuple[list[echo_pb2.EchoResponse], dict[str, str]]:
    """Messages and trailers of a gRPC-Web body. Text mode: each 4-character unit may be padded
    (the proxy encodes each chunk on its own), so it is decoded unit run by unit run."""
    if text:
        raw = b""
        start = 0
        while start < len(body):
            pad = body.find(b"=", start)
            end = len(body) if pad < 0 else (pad // 4 + 1) * 4
            raw += base64.b64decode(body[start:end], validate=True)
            start = end
        body = raw
    messages: list[echo_pb2.EchoResponse] = []
    trailers: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        flag = body[pos]
        (length,) = struct.unpack(">I", body[pos + 1 : pos + 5])
        chunk = body[pos + 5 : pos + 5 + length]
        assert len(chunk) == length, "truncated frame in the response"
        pos += 5 + length
        if flag & 0x80:
            for line in chunk.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip()] = value.strip()
            assert pos == len(body), "bytes after the trailer frame"
        else:
            messages.append(echo_pb2.EchoResponse.FromString(chunk))
    return messages, trailers


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


def curl(
    url: str,
    body: bytes,
    *,
    http2: bool,
    content_type: str = BINARY_CT,
    headers: Sequence[str] = (),
    tmp: Path,
    method: str = "POST",
) -> WebResponse:
    """One request with curl (HTTP/1.1, or HTTP/2 with prior knowledge)."""
    exe = require_tool("curl")
    request = tmp / "request.bin"
    request.write_bytes(body)
    out = tmp / "response.bin"
    head = tmp / "head.txt"
    argv = [
        exe, "-sS", "--max-time", "30", "-X", method,
        "--http2-prior-knowledge" if http2 else "--http1.1",
        "-H", f"content-type: {content_type}", "-D", str(head), "-o", str(out),
    ]  # fmt: skip
    for h in headers:
        argv += ["-H", h]
    if method == "POST":
        argv += ["--data-binary", f"@{request}"]
    subprocess.run([*argv, url], check=True, capture_output=True, timeout=40)
    # The last head (curl writes a 100-continue's too).
    status, fields = parse_head(head.read_bytes().strip().split(b"\r\n\r\n")[-1])
    data = out.read_bytes() if out.exists() else b""
    response = WebResponse(status, fields)
    if fields.get("content-type", "").startswith("application/grpc-web"):
        text = fields["content-type"].startswith(TEXT_CT)
        response.messages, response.trailers = decode_body(data, text)
    return response


# ---------------------------------------------------------------------------- raw HTTP/1.1


def web_request(
    path: str,
    body: bytes,
    *,
    content_type: str = TEXT_CT,
    headers: Sequence[tuple[str, str]] = (),
    host: str = "proxy",
) -> bytes:
    fields = [("host", host), ("content-type", content_type), ("content-length", str(len(body)))]
    fields += list(headers)
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode() + body


class RawHttp1:
    """An HTTP/1.1 client on a plain socket that reads chunked responses as they come."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}; got {self.buf[:200]!r}")
        part, _, self.buf = self.buf.partition(marker)
        return part

    def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed inside a body")
        part, self.buf = self.buf[:n], self.buf[n:]
        return part

    def read_response(self) -> tuple[int, dict[str, str], list[tuple[float, bytes]]]:
        """Status, headers, and the body's chunks with the time each arrived."""
        status, headers = parse_head(self._read_until(b"\r\n\r\n"))
        chunks: list[tuple[float, bytes]] = []
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    break
                chunks.append((time.monotonic(), self._read_exactly(size)))
                self._read_exactly(2)
        else:
            length = int(headers.get("content-length", "0"))
            if length:
                chunks.append((time.monotonic(), self._read_exactly(length)))
        return status, headers, chunks

    def web_call(self, request: bytes) -> WebResponse:
        self.send(request)
        return self.read_web_response()

    def read_web_response(self) -> WebResponse:
        status, headers, chunks = self.read_response()
        response = WebResponse(status, headers)
        body = b"".join(c for _, c in chunks)
        if headers.get("content-type", "").startswith("application/grpc-web"):
            text = headers["content-type"].startswith(TEXT_CT)
            response.messages, response.trailers = decode_body(body, text)
        return response

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the proxy has closed its side (EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
