"""`serve --workers N`: N worker processes share the listen port; this process supervises them.

Each worker is `python -m proxy serve` with the same settings (the flags it was given; the
environment and the --config file are read again by the worker) plus `--workers 1 --admin off`
and two hidden flags, `--worker-index I --admin-socket PATH`: it binds the listen port with
SO_REUSEPORT (the kernel spreads new connections over the workers' accept queues, by a hash of
the connection's addresses), runs its own backend pool and etcd watch, and serves its admin
endpoint on a unix socket. The supervisor serves the admin port and answers from its workers'
sockets (see proxy.ops.workers_admin).

Signals: SIGTERM/SIGINT -> SIGTERM to every worker (each drains), exit 0 once all have exited
0; a second one -> SIGKILL to every worker, exit 1; SIGHUP -> SIGHUP to every worker (each
reloads). A worker that dies on its own is started again after a backoff that doubles while it
keeps dying young (0.5 s, 1 s, 2 s ... 30 s). A worker that exits 2 has a bad configuration:
restarting it would not help, so everything stops and the supervisor exits 2.

Workers run in their own session, so a Ctrl-C on the terminal reaches the supervisor alone
(which passes one SIGTERM on; the terminal's SIGINT to each worker as well would count as a
second signal there). A worker asks the kernel for SIGTERM when the supervisor dies, so none
outlives it, even after a SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from proxy.app import config
from proxy.app.lifecycle import EXIT_HARD, STOP_SIGNALS
from proxy.ops.workers_admin import WorkersAdmin

if TYPE_CHECKING:
    from proxy.app.config import HostPort, ListenAddress, ServeConfig
    from proxy.runtime.server import ProxyServer

log = structlog.get_logger("proxy.supervisor")

EXIT_CONFIG: Final = 2  # what `serve` exits with on a bad setting
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
STABLE_AFTER_S: Final = 10.0  # a worker that lived this long died of something new: back off less
# The workers enforce the drain timeout themselves; this is for one that hangs regardless.
KILL_AFTER_DRAIN_S: Final = 10.0
_PR_SET_PDEATHSIG: Final = 1


# ---------------------------------------------------------------------------- worker side


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What makes a `serve` process a worker of a supervisor."""

    index: int
    admin_socket: str

    def prepare(self) -> bool:
        """Call first thing. False when the supervisor is already gone (then exit)."""
        # A SIGHUP forwarded before the loop's handler is installed must not kill us; a
        # SIGTERM then keeps its default action (nothing is served yet, so nothing is lost).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return die_with_parent()

    async def start_admin(self, stack: contextlib.AsyncExitStack, server: ProxyServer) -> None:
        from proxy.ops.admin.app import ServerAdmin
        from proxy.ops.admin.http import admin_on

        path = self.admin_socket
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        if not await admin_on(stack, ServerAdmin(server, worker=self.index), "", None, path):
            raise OSError(f"cannot listen on the worker admin socket {path}")


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """The hidden flags the supervisor starts its workers with."""
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--admin-socket", default=None, help=argparse.SUPPRESS)


def worker_role(args: argparse.Namespace) -> WorkerRole | None:
    index = getattr(args, "worker_index", None)
    path = getattr(args, "admin_socket", None)
    if index is None or path is None:
        return None
    return WorkerRole(index, path)


def die_with_parent() -> bool:
    """Linux: have the kernel send us SIGTERM when our parent dies. False if it already has."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM must do
        return True
    return os.getppid() == parent  # it died between our start and the prctl


# ---------------------------------------------------------------------------- supervisor side


class Phase(Enum):
    RUNNING = 1
    DRAINING = 2
    KILLING = 3


@dataclass(slots=True)
class Worker:
    index: int
    admin_socket: str
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    young_deaths: int = 0  # deaths in a row, each within STABLE_AFTER_S of its start
    exit_code: int | None = None  # of the process that was running when the stop began

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def signal(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def worker_argv(
    flags: dict[str, Any], index: int, listen: Sequence[ListenAddress], admin_socket: str
) -> list[str]:
    """The command line of worker `index`: the supervisor's own flags, with the listen ports
    resolved (and TLS or not spelled out) and the worker's own admin. `--flag=value`, so a
    value may start with '-'."""
    argv = [sys.executable, "-m", "proxy", "serve"]
    for name, value in flags.items():
        if name in ("workers", "admin", "listen"):
            continue
        flag = config.BY_NAME[name].flag
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            argv += [f"{flag}={item}" for item in value]
        else:
            argv.append(f"{flag}={value}")
    argv += ["--workers=1", "--admin=off", *(f"--listen={address}" for address in listen)]
    argv += [f"--worker-index={index}", f"--admin-socket={admin_socket}"]
    return argv


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) the listen address with SO_REUSEPORT: it resolves port 0 to
    the one every worker will share, fails early and clearly if someone else holds the port,
    and keeps the port ours while workers restart. A socket that does not listen gets no
    connections."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, cfg: ServeConfig, flags: dict[str, Any]) -> None:
        self.cfg = cfg
        self.flags = flags
        self.workers: list[Worker] = []
        self.phase = Phase.RUNNING
        self.listen: tuple[ListenAddress, ...] = cfg.listen
        self.config_error = False
        self._stopping: asyncio.Event | None = None
        self._kill_timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.phase is not Phase.RUNNING

    async def run(self) -> int:
        with contextlib.ExitStack() as reserved:
            resolved = []
            for address in self.cfg.listen:
                try:
                    sock = reserved.enter_context(reserve_port(address.host, address.port))
                except OSError as exc:
                    print(
                        f"grpc-etcd-proxy: --listen {address}: cannot bind: {exc.strerror or exc}",
                        file=sys.stderr,
                    )
                    return 1
                port = sock.getsockname()[1]
                resolved.append(
                    dataclasses.replace(address, port=port, tls=self.cfg.is_tls(address))
                )
            self.listen = tuple(resolved)
            return await self._run_workers()

    async def _run_workers(self) -> int:
        with tempfile.TemporaryDirectory(prefix="grpc-etcd-proxy-") as tmp:
            self.workers = [
                Worker(i, str(Path(tmp) / f"worker-{i}.sock")) for i in range(self.cfg.workers)
            ]
            return await self._supervise()

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        async with contextlib.AsyncExitStack() as stack:
            if self.cfg.admin is not None and not await self._start_admin(stack, self.cfg.admin):
                return 1
            log.info(
                "supervising",
                workers=len(self.workers),
                listen=[str(address) for address in self.listen],
                pid=os.getpid(),
            )
            await asyncio.gather(*(self._keep(w) for w in self.workers))
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        return self._exit_code()

    def _exit_code(self) -> int:
        if self.config_error:
            return EXIT_CONFIG
        if self.phase is Phase.KILLING:
            return EXIT_HARD
        # A worker the SIGTERM reached before it could handle it had nothing to drain.
        clean = (None, 0, -signal.SIGTERM)
        bad = {w.index: w.exit_code for w in self.workers if w.exit_code not in clean}
        if bad:
            log.error("workers_failed", exit_codes=bad)
            return 1
        log.info("stopped", workers=len(self.workers))
        return 0

    async def _start_admin(self, stack: contextlib.AsyncExitStack, address: HostPort) -> bool:
        from proxy.ops.admin.http import admin_on

        return await admin_on(stack, WorkersAdmin(self), *address)

    async def _keep(self, worker: Worker) -> None:
        """Run one worker until the stop; start it again each time it dies before that."""
        stopping = self._stopping
        assert stopping is not None
        while self.phase is Phase.RUNNING:
            pid, code = await self._run_once(worker)
            if self.phase is not Phase.RUNNING:
                worker.exit_code = code
                log.info("worker_exited", worker=worker.index, pid=pid, exit_code=code)
                return
            if code == EXIT_CONFIG:
                log.error(
                    "worker_failed",
                    worker=worker.index,
                    pid=pid,
                    exit_code=code,
                    detail="bad configuration: stopping every worker",
                )
                self.config_error = True
                self._begin_stop("worker configuration error")
                return
            lived = asyncio.get_running_loop().time() - worker.started_at
            worker.young_deaths = worker.young_deaths + 1 if lived < STABLE_AFTER_S else 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (worker.young_deaths - 1))
            log.error(
                "worker_died",
                worker=worker.index,
                pid=pid,
                exit_code=code,
                lived_s=round(lived, 3),
                restart_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
                return  # stopped during the backoff: this worker has nothing to drain
            worker.restarts += 1

    async def _run_once(self, worker: Worker) -> tuple[int | None, int | None]:
        """Start the worker and wait for it to exit: (pid, exit code), Nones if it could not
        be started."""
        argv = worker_argv(self.flags, worker.index, self.listen, worker.admin_socket)
        worker.started_at = asyncio.get_running_loop().time()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            log.error("worker_start_failed", worker=worker.index, error=str(exc))
            return None, None
        worker.proc = proc
        log.info("worker_started", worker=worker.index, pid=proc.pid)
        late = self._late_signal()  # the stop came while it was being started
        if late is not None:
            worker.signal(late)
        return proc.pid, await proc.wait()

    def _late_signal(self) -> signal.Signals | None:
        """What a worker started during the stop gets at once."""
        if self.phase is Phase.DRAINING:
            return signal.SIGTERM
        if self.phase is Phase.KILLING:
            return signal.SIGKILL
        return None

    # ------------------------------------------------------------------ signals

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.phase is Phase.RUNNING:
            log.info("signal", signal=sig.name, action="drain workers")
            self._begin_stop(sig.name)
        elif self.phase is Phase.DRAINING:
            log.warning("signal", signal=sig.name, action="kill workers", exit_code=EXIT_HARD)
            self._kill_all()
        else:
            log.warning("signal", signal=sig.name, action="exit_immediately", exit_code=EXIT_HARD)
            os._exit(EXIT_HARD)

    def _begin_stop(self, why: str) -> None:
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.DRAINING
        assert self._stopping is not None
        self._stopping.set()
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        self._kill_timer = asyncio.get_running_loop().call_later(
            self.cfg.drain_timeout + KILL_AFTER_DRAIN_S, self._drain_overdue
        )
        log.info("draining_workers", reason=why, drain_timeout_s=self.cfg.drain_timeout)

    def _drain_overdue(self) -> None:
        log.error("workers_drain_overdue", action="kill workers")
        self._kill_all()

    def _kill_all(self) -> None:
        self.phase = Phase.KILLING
        for worker in self.workers:
            worker.signal(signal.SIGKILL)

    def _on_hangup(self) -> None:
        if self.phase is not Phase.RUNNING:
            return
        log.info("signal", signal="SIGHUP", action="reload workers")
        for worker in self.workers:
            worker.signal(signal.SIGHUP)


def supervise(cfg: ServeConfig, flags: dict[str, Any]) -> int:
    """Run `serve` as a supervisor of `cfg.workers` workers; returns the exit code."""
    return _run(Supervisor(cfg, flags).run())


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))
