"""The discovery commands of the CLI: ``endpoints`` (what the proxy sees) and ``register``.

The CLI parses flags and calls :func:`run_endpoints` / :func:`run_register`; both return the
process exit code. Output goes to the given streams so tests can read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from proxy.core.backoff import Backoff
from proxy.core.units import SECONDS
from proxy.discovery.etcd_model import EtcdAuthError, EtcdConfig, EtcdError, etcd_config
from proxy.discovery.registration import Registration
from proxy.discovery.watcher import EtcdDiscovery, TargetWatch

# How long `endpoints` without --watch waits for the first listing before saying why not.
LIST_TIMEOUT_S = 10 * SECONDS


def parse_metadata(text: str) -> Any:
    """The ``--metadata`` flag: any JSON value (an object, a string, null, ...)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--metadata must be JSON ({exc}); quote a string: '\"id-1\"'") from exc


def format_pool(watch: TargetWatch) -> str:
    """The pool of a target as the proxy sees it, invalid values flagged with the reason."""
    snapshot = watch.pool.snapshot
    invalid = watch.invalid
    where = f"etcd revision {watch.last_revision}, {watch.state.value}"
    if watch.last_error:
        where += f", last error: {watch.last_error}"
    count = len(snapshot.endpoints)
    if count:
        lines = [f"{watch.target}: {count} endpoint{'s' if count != 1 else ''} ({where})"]
    else:
        lines = [f"{watch.target}: no endpoints: {snapshot.reason} ({where})"]
    for endpoint in snapshot.endpoints:
        line = f"  {endpoint.address}  key={endpoint.key}"
        if endpoint.metadata is not None:
            line += f"  metadata={json.dumps(endpoint.metadata, separators=(',', ':'))}"
        if endpoint.key in invalid:
            line += "  (stale: the current value is invalid, see below)"
        lines.append(line)
    for key, bad in sorted(invalid.items()):
        lines.append(f"  INVALID {key}: {bad.reason}")
    return "\n".join(lines)


async def run_endpoints(
    etcd: EtcdConfig | str | Sequence[str],
    target: str,
    *,
    watch: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``grpc-etcd-proxy endpoints``: print the pool of ``target`` as the proxy sees it.

    Without ``watch``: one listing, exit 0, or exit 1 with the reason if etcd cannot be
    read. With ``watch``: print the pool again at every change until SIGINT/SIGTERM (exit 0).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    async with EtcdDiscovery(etcd_config(etcd), [target], backoff=Backoff(max_s=2.0)) as disc:
        state = disc.watches[target.rstrip("/")]
        await disc.wait_ready(LIST_TIMEOUT_S)
        if not watch:
            if not state.has_listed:
                print(f"cannot list {state.prefix!r}: {state.pool.snapshot.reason}", file=err)
                return 1
            print(format_pool(state), file=out, flush=True)
            return 0
        printed = ""

        def show(changed: TargetWatch) -> None:
            nonlocal printed
            text = format_pool(changed)
            if text != printed:
                printed = text
                print(text + "\n", file=out, flush=True)

        with _stop_on_signals() as stop:
            show(state)
            state.subscribe(show)
            await stop.wait()
    return 0


async def run_register(
    etcd: EtcdConfig | str | Sequence[str],
    target: str,
    addr: str,
    *,
    ttl: int = 10,
    metadata: Any = None,
    out: TextIO | None = None,
) -> int:
    """``grpc-etcd-proxy register``: keep ``addr`` registered under ``target`` until a signal.

    Retries while etcd is unreachable; exits 1 if etcd refuses the credentials, 0 after
    SIGINT/SIGTERM once the key is deleted and the lease revoked. Raises ValueError for an
    ``addr`` that is not ``host:port`` or a ``ttl`` under 1 (validate flags before).
    """
    out = out or sys.stderr
    delays = Backoff(max_s=5.0).delays()
    with _stop_on_signals() as stop:
        while not stop.is_set():
            try:
                async with Registration(etcd, target, addr, ttl, metadata) as reg:
                    lease = f"{reg.lease.id:x}" if reg.lease else "?"
                    print(f"registered {reg.key} (lease {lease}, ttl {ttl}s)", file=out, flush=True)
                    await stop.wait()
                print(f"deregistered {reg.key}", file=out, flush=True)
            except EtcdAuthError as exc:
                print(f"etcd refused the credentials: {exc}", file=out, flush=True)
                return 1
            except EtcdError as exc:
                delay = next(delays)
                print(f"cannot register yet ({exc}); retrying in {delay:.1f}s", file=out)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (handlers removed after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not on Windows' loops, nor off the main thread: Ctrl-C then ends the process.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
