"""Shared pieces of the abuse tests: a running proxy handle and a well-behaved bystander.

Import as ``from abuse_support import ...`` (pytest puts ``tests/abuse`` on ``sys.path``).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from backends import echo_stub, open_channel
from proxy_process import proxy_output

from proxy_examples.echo import echo_pb2


@dataclass
class RunningProxy:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return proxy_output(self.proc)

    def tripped(self, limit: str) -> bool:
        """The proxy logged a connection closed for this abuse limit (its log lines are JSON
        when stderr is not a terminal)."""
        return f'"limit": "{limit}"' in self.output()

    def wait_tripped(self, limit: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.tripped(limit):
            if time.monotonic() > deadline:
                raise AssertionError(f"limit {limit!r} not logged:\n{self.output()}")
            time.sleep(0.02)
        return self.output()


ProxyFactory = Callable[..., RunningProxy]


@dataclass
class Bystander:
    """A grpcio client on its own channel calling UnaryEcho in a loop on a thread."""

    target: str
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    slowest_s: float = 0.0  # the longest call of the loop

    def __post_init__(self) -> None:
        self.channel = open_channel(self.target)
        self.stub = echo_stub(self.channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def call(self, message: str = "bystander") -> None:
        reply = self.stub.UnaryEcho(echo_pb2.EchoRequest(message=message), timeout=5)
        assert reply.message == message

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                self.call(f"bystander {n}")
                self.ok += 1
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            except (grpc.RpcError, AssertionError) as exc:
                # When it failed, on the clock of the proxy's log lines (monotonic time differs).
                self.errors.append(f"at {time.strftime('%H:%M:%S')}: {exc!r}")
            self._stop.wait(0.005)

    def start(self) -> Bystander:
        self.call("warm-up")  # connected and working before the abuse starts
        self._thread.start()
        return self

    def calls_right_now(self, count: int = 5) -> None:
        for i in range(count):
            self.call(f"right after {i}")

    def wait_for_calls(self, count: int, timeout: float = 10.0) -> None:
        """Wait until the loop has made `count` more successful calls."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target and not self.errors:
            assert time.monotonic() < deadline, f"bystander stalled at {self.ok} calls"
            time.sleep(0.01)

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self.channel.close()

    def finish(self) -> None:
        """Stop; every call made during the test must have succeeded."""
        self.stop()
        assert self.errors == [], f"the bystander's calls failed: {self.errors[:5]}"
        assert self.ok > 0, "the bystander made no calls"


BystanderFactory = Callable[[RunningProxy], Bystander]
