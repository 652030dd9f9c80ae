"""Helpers for the discovery tests: a real etcd process, a cuttable TCP forwarder, polling.

Import as ``from etcd_support import ...`` (``tests/discovery`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from proxy.core.backoff import Backoff

# Retries fast enough that outage tests take a second or two, not the production 5 s cap.
FAST = Backoff(initial_s=0.05, max_s=0.3)


class EtcdServer:
    """One etcd member in a temporary directory; ``start``/``stop`` keep its data and ports."""

    def __init__(
        self,
        binary: str,
        etcdctl: str,
        workdir: Path,
        client_port: int,
        peer_port: int,
        extra_args: tuple[str, ...] = (),
        scheme: str = "http",
    ) -> None:
        self.binary = binary
        self.etcdctl_path = etcdctl
        self.workdir = workdir
        self.client_port = client_port
        self.peer_port = peer_port
        self.extra_args = extra_args
        self.scheme = scheme
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl_args: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "etcd.log"

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None, "already running"
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        data = self.workdir / "data"
        args = [
            self.binary,
            "--name=test",
            f"--data-dir={data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            # A short election timeout makes a one-member cluster ready in ~0.2 s.
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--logger=zap",
            "--log-level=warn",
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        if self.scheme != "http":
            # TLS servers: ask etcdctl, which has the certificates.
            result = self.run_etcdctl("endpoint", "health", check=False)
            return result.returncode == 0
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=0.5) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def run_etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(
            [self.etcdctl_path, f"--endpoints={self.endpoint}", *self.ctl_args, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=15,
            check=check,
        )

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against this member and return its stdout (raises on failure)."""
        return self.run_etcdctl(*args).stdout

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return "(no log)"


# The type of the ``etcd_servers`` fixture (see conftest.py).
EtcdFactory = Callable[..., EtcdServer]


class Forwarder:
    """A TCP forwarder on 127.0.0.1 that can be cut (connections reset, port closed)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Reset every forwarded connection and refuse new ones until :meth:`restore`."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer), name="forwarder-up"),
            asyncio.create_task(self._pipe(up_reader, writer), name="forwarder-down"),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._tasks.discard(task)
            for side in (writer, up_writer):
                side.transport.abort()
                self._writers.discard(side)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> float:
    """Poll ``check`` every 5 ms until true; returns how long it took, fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return loop.time() - start
