"""Signals: how `serve` stops and reloads.

- SIGTERM or SIGINT: graceful drain (`ProxyServer.drain`), then `run_until_stopped` returns 0
  and the caller closes the rest (pools, discovery) and exits 0.
- A second SIGTERM or SIGINT during the drain: stop waiting; `run_until_stopped` returns
  `EXIT_HARD` (1) at once and the caller's clean-up closes every connection as it is. One more
  while that clean-up runs exits the process on the spot (`os._exit(EXIT_HARD)`): whoever sends
  a third signal wants it gone, whatever holds it.
- SIGHUP: `reload()` (routes and policies), one at a time; a failed reload is logged and the
  proxy keeps its previous configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING, Final

import structlog

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer

log = structlog.get_logger("proxy.lifecycle")

EXIT_DRAINED: Final = 0
EXIT_HARD: Final = 1
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

Reload = Callable[[], Awaitable[None]]


class Phase(Enum):
    RUNNING = 1
    DRAINING = 2
    HARD_STOP = 3  # a second signal came: returning without waiting


class Signals:
    """The state the handlers move along; the handlers only set events (they run in the loop,
    between callbacks, so they must not block)."""

    def __init__(self, reload: Reload | None) -> None:
        self.phase = Phase.RUNNING
        self.drain = asyncio.Event()
        self.hard = asyncio.Event()
        self._reload = reload
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def stop(self, sig: signal.Signals) -> None:
        if self.phase is Phase.RUNNING:
            self.phase = Phase.DRAINING
            log.info("signal", signal=sig.name, action="drain")
            self.drain.set()
        elif self.phase is Phase.DRAINING:
            self.phase = Phase.HARD_STOP
            log.warning("signal", signal=sig.name, action="exit_now", exit_code=EXIT_HARD)
            self.hard.set()
        else:
            log.warning("signal", signal=sig.name, action="exit_immediately", exit_code=EXIT_HARD)
            os._exit(EXIT_HARD)

    def hangup(self) -> None:
        if self._reload is None:
            log.info("signal", signal="SIGHUP", action="ignored (nothing to reload)")
            return
        if self.phase is not Phase.RUNNING:
            log.info("signal", signal="SIGHUP", action="ignored (stopping)")
            return
        log.info("signal", signal="SIGHUP", action="reload")
        task = asyncio.get_running_loop().create_task(self._run_reload(self._reload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_reload(self, reload: Reload) -> None:
        async with self._reload_lock:  # two SIGHUPs in a row: the second reload follows
            try:
                await reload()
            except Exception:
                log.exception("reload_failed")


def install(signals: Signals) -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, signals.stop, sig)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, signals.hangup)


async def run_until_stopped(
    server: ProxyServer, drain_timeout_s: float, reload: Reload | None
) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the exit code (see the module doc).

    The handlers stay installed after the return, so a signal during the caller's clean-up
    still exits at once."""
    signals = Signals(reload)
    install(signals)
    server.serving = True
    await signals.drain.wait()
    drain = asyncio.ensure_future(server.drain(drain_timeout_s))
    hard = asyncio.ensure_future(signals.hard.wait())
    await asyncio.wait({drain, hard}, return_when=asyncio.FIRST_COMPLETED)
    if drain.done():
        hard.cancel()
        drain.result()  # a failed drain is a bug: let it surface
        signals.phase = Phase.HARD_STOP  # from here on, a signal exits on the spot
        return EXIT_DRAINED
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    return EXIT_HARD
