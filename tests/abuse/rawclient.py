"""A raw-socket HTTP/2 client for abuse tests: it writes whatever frames a test builds (with the
codec's own frame factory, `proxy.core.h2.frames`) and reads the proxy's frames back with a timeout.

Import as ``from rawclient import RawH2Client`` (pytest puts ``tests/abuse`` on ``sys.path``).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from hpack import Encoder

from proxy.core.h2 import frames as fr

GRPC_PATH = "/echo.Echo/UnaryEcho"


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes

    def settings(self) -> dict[int, int]:
        assert self.kind == fr.SETTINGS
        return {
            k: v
            for k, v in (
                struct.unpack_from(">HI", self.payload, i) for i in range(0, len(self.payload), 6)
            )
        }

    def error_code(self) -> int:
        """The error code of a RST_STREAM or GOAWAY frame."""
        if self.kind == fr.RST_STREAM:
            return int(struct.unpack(">I", self.payload)[0])
        assert self.kind == fr.GOAWAY, self
        return int(struct.unpack_from(">I", self.payload, 4)[0])

    @property
    def debug(self) -> bytes:
        assert self.kind == fr.GOAWAY
        return self.payload[8:]


def parse_frames(buf: bytearray) -> list[Frame]:
    """Remove the complete frames at the start of buf and return them."""
    out: list[Frame] = []
    pos = 0
    while len(buf) - pos >= fr.FRAME_HEADER_SIZE:
        length, kind, flags, sid = fr.parse_header(buf, pos)
        if len(buf) - pos - fr.FRAME_HEADER_SIZE < length:
            break
        start = pos + fr.FRAME_HEADER_SIZE
        out.append(Frame(kind, flags, sid, bytes(buf[start : start + length])))
        pos = start + length
    del buf[:pos]
    return out


def request_headers(path: str = GRPC_PATH, extra: list[tuple[str, str]] | None = None) -> list:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "proxy.test"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *(extra or []),
    ]


class RawH2Client:
    def __init__(self, port: int, *, rcvbuf: int | None = None, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Must be set before connect to bound the advertised TCP window.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect((host, port))
        self.encoder = Encoder()
        self.buf = bytearray()
        self.frames: list[Frame] = []  # everything read so far, in order
        self.eof = False
        self.bytes_read = 0

    # ---------------------------------------------------------------- writing

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, settings: dict[int, int] | None = None) -> None:
        self.send(fr.PREFACE + fr.settings(settings or {}))

    def block(self, headers: list, huffman: bool = True) -> bytes:
        return self.encoder.encode(headers, huffman=huffman)

    def headers_frame(self, sid: int, headers: list, end_stream: bool = False) -> bytes:
        return fr.headers(sid, self.block(headers), end_stream)

    # ---------------------------------------------------------------- reading

    def _read_once(self, deadline: float) -> bool:
        """Read what is there (waiting until deadline); False on timeout or EOF."""
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.bytes_read += len(chunk)
        self.buf += chunk
        self.frames.extend(parse_frames(self.buf))
        return True

    def wait_for(
        self, kind: int, timeout: float = 5.0, stream_id: int | None = None, flags: int = -1
    ) -> Frame:
        """The first frame of this kind (and stream, and exact flags) read so far, or read
        within timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if (
                    frame.kind == kind
                    and (stream_id is None or frame.stream_id == stream_id)
                    and (flags < 0 or frame.flags == flags)
                ):
                    return frame
            seen = len(self.frames)
            if not self._read_once(deadline):
                kinds = sorted({f.kind for f in self.frames})
                raise AssertionError(
                    f"no frame of type {kind} (stream {stream_id}) within {timeout}s; "
                    f"eof={self.eof}, read {self.bytes_read} bytes, frame types seen {kinds}"
                )

    def server_settings(self, timeout: float = 5.0) -> dict[int, int]:
        """The values of the peer's first (non-ACK) SETTINGS frame."""
        return self.wait_for(fr.SETTINGS, timeout, flags=0).settings()

    def find_goaway(self, timeout: float = 5.0) -> Frame:
        return self.wait_for(fr.GOAWAY, timeout)

    def wait_for_eof(self, timeout: float = 5.0) -> bool:
        """Read and drop until the peer closes; True if it did within timeout."""
        deadline = time.monotonic() + timeout
        while self._read_once(deadline):
            pass
        return self.eof

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
