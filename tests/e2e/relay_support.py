"""Helpers for the end-to-end relay tests (``tests/e2e``): a running proxy, its memory, raw
HTTP/2 frame parsing, and ports nobody listens on.

Import as ``from relay_support import ...`` (pytest puts ``tests/e2e`` on ``sys.path``; the
module name is unique across ``tests/``).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from backends import open_channel
from proxy_process import ClosedPort

MiB = 1024 * 1024
FRAME_GOAWAY = 0x7
PROTOCOL_ERROR = 0x1


@dataclass(frozen=True)
class Memory:
    """A process's resident set (``VmRSS``) and its peak so far (``VmHWM``), in bytes."""

    rss: int
    peak: int


def process_memory(pid: int) -> Memory:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                number, unit = value.split()
                assert unit == "kB", line
                fields[key] = int(number) * 1024
    return Memory(rss=fields["VmRSS"], peak=fields["VmHWM"])


@dataclass
class RunningProxy:
    """A ``python -m proxy serve`` subprocess and the channels a test opened to it."""

    proc: subprocess.Popen[bytes]
    port: int
    channels: list[grpc.Channel]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        """A new client channel (its own HTTP/2 connection); closed at teardown."""
        channel = open_channel(self.target)
        self.channels.append(channel)
        return channel

    def memory(self) -> Memory:
        assert self.proc.poll() is None, f"proxy exited with {self.proc.returncode}"
        return process_memory(self.proc.pid)


def read_until_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes; raises ``TimeoutError`` if it does not close
    within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"peer did not close within {timeout}s; got {b''.join(chunks)!r}")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue  # re-checked at the top
        except ConnectionResetError:
            return b"".join(chunks)  # closed too (abortively): what we read is all there is
        if not data:
            return b"".join(chunks)
        chunks.append(data)


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes


def parse_frames(data: bytes) -> list[Frame]:
    """Split a byte stream into HTTP/2 frames (9-byte header: length, type, flags, stream)."""
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9, f"truncated frame header at {pos}: {data[pos:]!r}"
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream_id = struct.unpack_from(">I", data, pos + 5)[0] & 0x7FFF_FFFF
        payload = data[pos + 9 : pos + 9 + length]
        assert len(payload) == length, f"truncated frame payload at {pos}: {data[pos:]!r}"
        frames.append(Frame(kind, flags, stream_id, payload))
        pos += 9 + length
    return frames


def goaway_error_code(frame: Frame) -> int:
    assert frame.type == FRAME_GOAWAY and frame.stream_id == 0, frame
    assert len(frame.payload) >= 8, frame
    code: int = struct.unpack_from(">I", frame.payload, 4)[0]
    return code


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test if it is still false after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


# Types of the fixtures in tests/e2e/conftest.py, for annotating tests (import them from here:
# "from conftest import ..." would depend on which conftest pytest loaded last).
ProxyFactory = Callable[..., RunningProxy]
ClosedPortFactory = Callable[[], ClosedPort]
