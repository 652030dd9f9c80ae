"""Overload, tried as an attacker would: many connections whose streams get large responses
they never read. What the proxy holds for them is bounded by its buffer budget (resident
memory read from /proc), a well-behaved client on the same proxy and backend keeps working,
and every shed is counted in the metrics (proxy/core/buffers.py, docs/reference/limits.md).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import h2.config
import h2.connection
import h2.exceptions
from abuse_support import BystanderFactory, ProxyFactory, RunningProxy
from backends import EchoSubprocessFactory, echo_stub, open_channel
from proxy_process import free_port, proxy_output
from rawclient import RawH2Client, request_headers

from proxy.core.h2 import frames as fr
from proxy.core.h2.errors import ErrorCode
from proxy_examples.echo.echo_pb2 import EchoRequest

MiB = 1024 * 1024
KiB = 1024
# The attack: without a budget the proxy would hold every stream's window of response bytes,
# 12 x 100 x 250 KiB = 293 MiB (measured: 191 MiB with 64 streams, budget and caps off).
CONNECTIONS = 12
STREAMS = 100
REQUEST = 250 * KiB  # echoed back: under the 256 KiB stream window each way
BUDGET = 32 * MiB
CONNECTION_BUFFER = 2 * MiB
BASE_WINDOW = 16 * KiB
# What the proxy may grow by: the budget (every byte it holds for a client counts in it: queued
# responses, requests waiting for a backend, the copies kept for a replay), plus what the
# interpreter holds beside: copies of the bytes in flight (read buffers, writes to a slow
# backend's socket) and freed memory the allocator keeps, 60 MiB. Measured: 15 MiB.
GROWTH_BOUND = BUDGET + 60 * MiB
# The well-behaved client's slowest call while all this goes on.
BYSTANDER_BOUND_S = 3.0


def rss_and_peak(pid: int) -> tuple[int, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def drain_stderr(proc: subprocess.Popen[str]) -> None:
    """Read the backend's stderr on a thread: a cancelled-call line per attacker stream would
    fill the pipe and block the backend."""
    assert proc.stderr is not None
    threading.Thread(target=proc.stderr.read, name="backend-stderr", daemon=True).start()


def metrics(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as page:
        return str(page.read().decode())


def counter(text: str, name: str, label: str) -> float:
    match = re.search(rf"^{name}{{{label}}} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class Attacker:
    """A client that honours flow control (the h2 library) but never reads a response: it
    opens STREAMS calls, sends each a REQUEST-byte message as the proxy's windows allow, and
    never acknowledges a response byte, so every response stops at the initial 64 KiB window
    and the rest waits in the proxy."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        body = b"x" * (REQUEST - 8)
        message = b"\x0a" + _varint(len(body)) + body
        self.unsent: dict[int, bytes] = {}
        for _ in range(STREAMS):
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, request_headers())
            self.unsent[sid] = grpc_message(message)
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
            # Shed: after the proxy's GOAWAY h2 refuses to send more (and may refuse what
            # arrives); a shed attacker just stops.
            return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_stalled_readers_on_many_connections_stay_within_the_buffer_budget(
    abuse_proxy: ProxyFactory, bystander: BystanderFactory, echo_subprocess: EchoSubprocessFactory
) -> None:
    # The backend runs in its own process: in this one it would share the interpreter (and
    # grpc-core) with the attackers' twelve threads and the bystander's client, and the test
    # would measure the test process. Seen once in CI with an in-process backend: one
    # bystander call out of 1,708 ended CANCELLED with the message "CANCELLED": trailers the
    # proxy never writes (its own errors describe what failed), so they came from grpc-core's
    # server, which had 1,200 attacker streams in flight in the test process.
    backend, backend_port = echo_subprocess("overload")
    drain_stderr(backend)
    admin = free_port()
    proxy: RunningProxy = abuse_proxy(
        "--buffer-budget",
        str(BUDGET),
        "--connection-buffer",
        str(CONNECTION_BUFFER),
        "--base-stream-window",
        str(BASE_WINDOW),
        "--admin",
        f"127.0.0.1:{admin}",
        backend=f"127.0.0.1:{backend_port}",
    )
    good = bystander(proxy)
    good.calls_right_now(20)
    baseline, _ = rss_and_peak(proxy.proc.pid)

    attackers: list[Attacker] = []
    peak_rss = baseline
    try:
        attackers += [Attacker(proxy.port) for _ in range(CONNECTIONS)]
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            rss, _ = rss_and_peak(proxy.proc.pid)
            peak_rss = max(peak_rss, rss)
            time.sleep(0.05)
        good.calls_right_now(5)
        text = metrics(admin)
    finally:
        for client in attackers:
            client.close()
    try:
        good.finish()
    except AssertionError:
        print(proxy_output(proxy.proc), file=sys.stderr)
        raise

    _, peak = rss_and_peak(proxy.proc.pid)
    grown = max(peak_rss, peak) - baseline
    assert grown <= GROWTH_BOUND, (
        f"the proxy grew by {grown / MiB:.0f} MiB under the attack (bound "
        f"{GROWTH_BOUND / MiB:.0f} MiB)"
    )
    assert good.slowest_s <= BYSTANDER_BOUND_S, f"a well-behaved call took {good.slowest_s:.2f} s"
    shed = counter(text, "grpc_proxy_overload_total", 'action="goaway"')
    refused = counter(text, "grpc_proxy_overload_total", 'action="refused_stream"')
    assert shed + refused >= 1, f"nothing shed:\n{text}"
    held = counter(text, "grpc_proxy_buffered_bytes", 'kind="queued"') + counter(
        text, "grpc_proxy_buffered_bytes", 'kind="granted"'
    )
    assert held <= BUDGET, held


def test_a_stalled_stream_is_reset_and_counted(abuse_proxy: ProxyFactory) -> None:
    admin = free_port()
    proxy = abuse_proxy("--stalled-stream-timeout", "1", "--admin", f"127.0.0.1:{admin}")
    with RawH2Client(proxy.port) as client:
        client.handshake({fr.SETTINGS_INITIAL_WINDOW_SIZE: 0})  # no response DATA at all
        body = b"y" * (40 * KiB)  # under the proxy's initial 64 KiB window
        message = b"\x0a" + _varint(len(body)) + body
        data = grpc_message(message)
        client.send(client.headers_frame(1, request_headers()))
        for pos in range(0, len(data), 16 * KiB):
            client.send(fr.data(1, data[pos : pos + 16 * KiB], pos + 16 * KiB >= len(data)))
        # The response waits for a window that never opens.
        started = time.monotonic()
        reset = client.wait_for(fr.RST_STREAM, timeout=10, stream_id=1)
        waited = time.monotonic() - started
        assert reset.error_code() == ErrorCode.CANCEL
        assert 0.5 <= waited <= 5, waited
        # The connection itself goes on: a second call on it is answered.
        client.send(client.headers_frame(3, request_headers()))
        small = b"\x0a\x02hi"
        client.send(fr.data(3, grpc_message(small), True))
        trailers = [
            f for f in (client.wait_for(fr.HEADERS, timeout=5, stream_id=3),) if f.stream_id == 3
        ]
        assert trailers
    text = metrics(admin)
    assert counter(text, "grpc_proxy_overload_total", 'action="stalled_stream"') == 1


def test_at_the_connection_cap_the_idle_connection_goes_first_and_a_busy_proxy_refuses(
    abuse_proxy: ProxyFactory,
) -> None:
    admin = free_port()
    proxy = abuse_proxy("--max-connections", "3", "--admin", f"127.0.0.1:{admin}")
    idle = [RawH2Client(proxy.port) for _ in range(3)]
    try:
        for client in idle:
            client.handshake()
            client.server_settings()
        # A fourth client is served: the oldest idle connection makes room (GOAWAY NO_ERROR).
        with open_channel(proxy.target) as channel:
            reply = echo_stub(channel).UnaryEcho(EchoRequest(message="in"), timeout=10)
            assert reply.message == "in"
        # One idle connection (the one idle the longest, by the proxy's clock) is sent
        # GOAWAY(NO_ERROR) and closed; the other two are left alone.
        for client in idle:
            client.wait_for_eof(1)
        closed = [c for c in idle if c.eof]
        assert len(closed) == 1, [sorted({f.kind for f in c.frames}) for c in idle]
        assert closed[0].find_goaway().error_code() == ErrorCode.NO_ERROR
    finally:
        for client in idle:
            client.close()

    # Three busy connections (a call each, its request not ended): nothing idle to close, so
    # a fourth connection is refused (closed before any SETTINGS).
    busy = [RawH2Client(proxy.port) for _ in range(3)]
    try:
        for client in busy:
            client.handshake()
            client.server_settings()
            client.send(client.headers_frame(1, request_headers()))
            client.send(fr.data(1, grpc_message(b"\x0a\x01x")[:3]))  # part of a message
        time.sleep(0.3)
        with RawH2Client(proxy.port) as refused:
            refused.handshake()
            assert refused.wait_for_eof()
            assert not any(f.kind == fr.SETTINGS for f in refused.frames)
        for client in busy:
            assert not client.eof
    finally:
        for client in busy:
            client.close()
    text = metrics(admin)
    assert counter(text, "grpc_proxy_overload_total", 'action="idle_closed"') >= 1
    assert counter(text, "grpc_proxy_overload_total", 'action="connection_refused"') == 1


def test_an_idle_connection_is_closed_after_the_idle_timeout(abuse_proxy: ProxyFactory) -> None:
    admin = free_port()
    proxy = abuse_proxy("--idle-timeout", "1", "--admin", f"127.0.0.1:{admin}")
    with RawH2Client(proxy.port) as client:
        client.handshake()
        client.server_settings()
        started = time.monotonic()
        goaway = client.find_goaway(timeout=10)
        assert goaway.error_code() == ErrorCode.NO_ERROR
        assert 0.9 <= time.monotonic() - started <= 5
        assert client.wait_for_eof()
    assert counter(metrics(admin), "grpc_proxy_overload_total", 'action="idle_timeout"') == 1


def test_a_connection_that_never_sends_its_preface_is_closed(abuse_proxy: ProxyFactory) -> None:
    admin = free_port()
    proxy = abuse_proxy("--preface-timeout", "1", "--admin", f"127.0.0.1:{admin}")
    with (
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
        RawH2Client(proxy.port) as fine,
    ):
        fine.handshake()  # one that does send it is served past the timeout
        sock.settimeout(10)
        started = time.monotonic()
        while sock.recv(65536):  # the proxy's SETTINGS, then EOF
            pass
        assert 0.9 <= time.monotonic() - started <= 5
        time.sleep(0.5)
        fine.send(fine.headers_frame(1, request_headers()))
        fine.send(fr.data(1, grpc_message(b"\x0a\x02hi"), True))
        assert fine.wait_for(fr.HEADERS, timeout=5, stream_id=1)
    assert counter(metrics(admin), "grpc_proxy_overload_total", 'action="preface_timeout"') == 1
