"""Issue 13's attack, side by side: the proxy with its buffer limits, and with them out of reach.

Run from the repository root::

    python -m loadtest.overload_bench [--connections 16] [--streams 256] [--request-kib 1000]

The attack: ``--connections`` HTTP/2 connections, each opening ``--streams`` calls to one
grpc-go echo backend (loadtest/goecho), each sending a ``--request-kib`` message as flow control
allows and never acknowledging a byte of the echoed response. Meanwhile a well-behaved grpcio
client calls UnaryEcho in a loop (5 s deadline) through the same proxy and backend. For each
configuration the bench prints the proxy's resident-memory growth (peak, from /proc), the
bystander's calls, errors and slowest call, and what the proxy shed
(``grpc_proxy_overload_total``).

This is a benchmark, not a test: it never judges the figures (tests/abuse/test_overload.py
asserts the behaviour). Exit status: 0 once both ran, 2 when the backend or proxy would not start.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import NamedTuple

import grpc
import h2.config
import h2.connection
import h2.exceptions

from loadtest import rounds
from proxy_examples.echo import echo_pb2, echo_pb2_grpc

REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/echo.Echo/UnaryEcho"),
    (":authority", "bench"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
OUT_OF_REACH = [
    "--buffer-budget",
    str(1 << 40),
    "--connection-buffer",
    str(1 << 40),
    "--base-stream-window",
    str(256 * 1024),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(2)
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Attacker:
    """Honours flow control, never acknowledges a response byte."""

    def __init__(self, port: int, streams: int, request: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        body = b"x" * (request - 8)
        message = b"\x0a" + _varint(len(body)) + body
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        self.unsent: dict[int, bytes] = {}
        for _ in range(streams):
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, REQUEST_HEADERS)
            self.unsent[sid] = framed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for sid, data in list(self.unsent.items()):
            try:
                window = self.h2.local_flow_control_window(sid)
            except h2.exceptions.StreamClosedError:
                del self.unsent[sid]
                continue
            while window > 0 and data:
                n = min(window, len(data), self.h2.max_outbound_frame_size)
                self.h2.send_data(sid, data[:n], end_stream=n == len(data))
                data, window = data[n:], window - n
            if data:
                self.unsent[sid] = data
            else:
                del self.unsent[sid]
        self.sock.sendall(self.h2.data_to_send())

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        try:
            self._pump()
            while not self.stop.is_set():
                try:
                    chunk = self.sock.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                self.h2.receive_data(chunk)
                self._pump()
        except (OSError, h2.exceptions.ProtocolError):
            return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class Bystander:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = echo_pb2_grpc.EchoStub(self.channel)
        self.ok = 0
        self.errors: list[str] = []
        self.slowest = 0.0
        self.stop = threading.Event()
        self.stub.UnaryEcho(echo_pb2.EchoRequest(message="warm-up"), timeout=10)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.stub.UnaryEcho(echo_pb2.EchoRequest(message="hi"), timeout=5)
                self.ok += 1
            except grpc.RpcError as exc:
                self.errors.append(exc.code().name)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.stop.wait(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.channel.close()


class Setup(NamedTuple):
    backend_port: int
    port: int
    admin: int
    backend: subprocess.Popen[bytes]
    proxy: subprocess.Popen[bytes]


def start(extra: list[str]) -> Setup:
    """A goecho backend and a proxy in front of it (admin on), started, not yet waited for."""
    backend_port, port, admin = free_port(), free_port(), free_port()
    backend = subprocess.Popen(
        [str(rounds.goecho_binary()), "-addr", f"127.0.0.1:{backend_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--backend", f"127.0.0.1:{backend_port}",
         "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
         "--access-log-sample", "0", *extra],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return Setup(backend_port, port, admin, backend, proxy)


def run(args: argparse.Namespace, label: str, extra: list[str]) -> None:
    backend_port, port, admin, backend, proxy = start(extra)
    attackers: list[Attacker] = []
    try:
        wait_port(backend_port, backend)
        wait_port(port, proxy)
        good = Bystander(f"127.0.0.1:{port}")
        base = peak = rss(proxy.pid)
        attackers = [
            Attacker(port, args.streams, args.request_kib * 1024) for _ in range(args.connections)
        ]
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            peak = max(peak, rss(proxy.pid))
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as page:
            metrics = page.read().decode()
        good.close()
        shed = dict(re.findall(r'^grpc_proxy_overload_total\{action="(\w+)"\} ([0-9.]+)$',
                               metrics, re.M))  # fmt: skip
        errors = {e: good.errors.count(e) for e in sorted(set(good.errors))}
        print(
            f"{label}: proxy RSS +{(peak - base) / 2**20:.0f} MiB; bystander {good.ok} calls, "
            f"errors {errors or 0}, slowest {good.slowest:.2f} s; shed {shed or 'nothing'}",
            flush=True,
        )
    finally:
        for attacker in attackers:
            attacker.close()
        for proc in (proxy, backend):
            proc.terminate()
            proc.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--request-kib", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(
        f"attack: {args.connections} connections x {args.streams} streams x "
        f"{args.request_kib} KiB echoed by loadtest/goecho, never read",
        flush=True,
    )
    run(args, "limits out of reach", OUT_OF_REACH)
    run(args, "default limits", [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
