"""`grpc-etcd-proxy demo`: etcd, three registered echo backends, the proxy and a client.

Theory of operation
-------------------
etcd runs as a child process (:class:`EmbeddedEtcd`: one member on 127.0.0.1:2379, data under
the user's cache directory; ``--etcd-port`` / ``--etcd-data-dir`` move it), and so do the three
echo backends; the proxy and the client run in this process. The proxy runs in this asyncio
loop as ``serve --etcd URL --target echo`` runs it: its default pool is
:class:`EtcdDiscovery`'s pool of the target ``echo``, i.e. every key under ``echo/`` in etcd,
kept in sync by a watch. Each change of that pool is printed.

Three echo backends (``python -m proxy_examples.echo.server``: grpcio servers with reflection
and grpc.health.v1) are registered with :class:`Registration`, as a backend process would do:
the key ``echo/ADDRESS`` under a 5 s lease kept alive, with metadata ``{"id": "backend-N"}``.
The proxy listens once its pool holds all three.

The built-in client is a blocking grpcio stub; every call runs in a worker thread
(``asyncio.to_thread``), so the loop, which is the proxy, never waits on it. Once every backend
has answered, one of them leaves the way a backend should: its registration ends (key deleted,
lease revoked), the proxy's watch drops it from the pool, and then its server stops. The calls
go on to the other two.

Everything started is owned by one :class:`contextlib.AsyncExitStack` and stopped in the
reverse order on exit, also when startup fails or is interrupted: client, proxy, backends
(deregistered, then stopped), discovery, etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from proxy.core.endpoints import Endpoint, PoolSnapshot, TargetPool
from proxy.core.options import ServerOptions
from proxy.core.routing import Router
from proxy.core.units import SECONDS
from proxy.discovery.embedded import EmbeddedEtcd, EmbeddedEtcdError
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig, EtcdError, etcd_config
from proxy.discovery.registration import Registration
from proxy.discovery.watcher import EtcdDiscovery, prefix_of
from proxy.runtime.server import ProxyServer
from proxy_examples.echo import echo_pb2, echo_pb2_grpc

T = TypeVar("T")

TARGET = "echo"  # the backends register under echo/; the proxy's default pool is its pool
BACKEND_NAMES = ("backend-1", "backend-2", "backend-3")
BACKEND_HOST = "127.0.0.1"
LEASE_TTL_S = 5  # a backend that dies without deregistering leaves the pool within this
DEFAULT_ETCD_PORT = 2379
DEFAULT_ETCD_PEER_PORT = 2380
POOL_TIMEOUT_S = 10 * SECONDS  # for the pool to show a registration or a deregistration
STOP_GRACE_S = 1 * SECONDS  # calls in flight on a stopping backend may finish within this
BACKEND_START_TIMEOUT_S = 30 * SECONDS  # a cold interpreter importing grpcio on a busy machine
CALL_INTERVAL_S = 0.5 * SECONDS
CALL_TIMEOUT_S = 2 * SECONDS
# A backend is stopped once every backend has answered and at least the first number of calls
# were made, or after the second number in any case: other clients sharing the proxy (ghz, a
# test) take turns in the rotation, so the demo's own calls may skip a backend for a while.
STOP_AFTER_CALLS = (3, 6)
STOPPED = 1  # index into BACKEND_NAMES: backend-2
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]  # never route 127.0.0.1 via $http_proxy


class DemoError(Exception):
    """The demo cannot start; the message says why."""


class Interrupted(Exception):
    """SIGINT or SIGTERM came while the demo was starting."""


def say(line: str) -> None:
    print(line, flush=True)


def dial_address(host: str, port: int) -> str:
    """Where a client on this machine reaches a listener bound to `host:port`."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def echo_proto() -> str:
    """The path to type for this checkout's protos/echo.proto (as in the repository otherwise).

    With it, ghz works against any backend. Without it, ghz resolves the method by server
    reflection, which the demo's echo backends answer for methods too (see
    `proxy_examples.echo.server.MethodSymbolPool`), while a plain grpcio backend does not
    (grpc/grpc#34743: "Symbol not found").
    """
    path = Path(__file__).resolve().parent.parent / "protos" / "echo.proto"
    if not path.is_file():
        return "protos/echo.proto"  # an installed wheel: the file is in the repository
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def hints(address: str, proto: str, etcd: str | None = None) -> list[str]:
    request = """'{"message":"hi"}'"""
    lines = [
        f"try: ghz --insecure --proto {proto} --call echo.Echo/UnaryEcho -d {request} {address}",
        f"     grpcurl -plaintext {address} list",
    ]
    if etcd is not None:
        lines.append(f"     grpc-etcd-proxy endpoints --etcd {etcd} --target {TARGET} --watch")
    return lines


def etcd_peer_port(client_port: int) -> int:
    """2380 beside the default client port 2379, else a free port (tests run demos side by
    side); a single member never dials it, it only has to be free."""
    if client_port == DEFAULT_ETCD_PORT:
        return DEFAULT_ETCD_PEER_PORT
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != client_port:
            return port


def endpoint_id(endpoint: Endpoint) -> str:
    """The ``id`` of the registration's metadata, else the etcd key."""
    metadata = endpoint.metadata
    if isinstance(metadata, dict) and isinstance(metadata.get("id"), str):
        return str(metadata["id"])
    return endpoint.key


def describe_pool(snapshot: PoolSnapshot) -> str:
    """``pool echo: 2 endpoints: backend-1 at 127.0.0.1:1234, backend-3 at ...``."""
    if not snapshot.endpoints:
        return f"pool {snapshot.target}: empty ({snapshot.reason})"
    members = sorted((endpoint_id(e), e.address) for e in snapshot.endpoints)
    count = len(members)
    listed = ", ".join(f"{name} at {address}" for name, address in members)
    return f"pool {snapshot.target}: {count} endpoint{'s' if count != 1 else ''}: {listed}"


def holds(backend: DemoBackend) -> Callable[[PoolSnapshot], bool]:
    """Whether a snapshot of the pool holds `backend`."""
    return lambda snapshot: backend.address in snapshot.addresses


class PoolView:
    """Prints every change of a pool (until muted) and lets the demo wait for one."""

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.muted = False
        self._changed = asyncio.Event()
        pool.subscribe(self._on_update)

    def _on_update(self, snapshot: PoolSnapshot) -> None:
        # Runs in the loop, in the discovery task, right after each change.
        if not self.muted:
            say(describe_pool(snapshot))
        self._changed.set()

    def mute(self) -> None:
        self.muted = True

    async def wait_for(self, condition: Callable[[PoolSnapshot], bool], timeout_s: float) -> bool:
        """Whether the pool meets `condition` within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition(self.pool.snapshot):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True


class DemoBackend:
    """An echo backend process registered in etcd under ``echo/ADDRESS`` while it runs.

    Each backend is ``python -m proxy_examples.echo.server`` in a process of its own, as real
    backends are: a load test against the demo (ghz) then measures the proxy, not three grpcio
    servers sharing the proxy's interpreter. :meth:`deregister` ends the registration (key
    deleted, lease revoked); :meth:`close` does that, then stops the process (SIGTERM: the
    server lets calls in flight finish for STOP_GRACE_S). Both may be called again, and after
    each other.
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process, port: int) -> None:
        self.name = name
        self.process = process
        self.address = f"{BACKEND_HOST}:{port}"
        self._registered = contextlib.AsyncExitStack()

    @classmethod
    async def serve(cls, name: str) -> DemoBackend:
        """Start the echo server process (not registered yet); see :meth:`register`."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy_examples.echo.server",
            "--port",
            "0",
            "--host",
            BACKEND_HOST,
            "--name",
            name,
            stdout=asyncio.subprocess.PIPE,
            # Its stderr says which calls were cancelled: not the demo's story.
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(BACKEND_START_TIMEOUT_S):
                while line := (await process.stdout.readline()).decode():
                    if line.startswith("listening "):  # printed once it accepts calls
                        return cls(name, process, int(line.rsplit(":", 1)[1]))
        except TimeoutError:
            pass
        except BaseException:
            await _stop(process)
            raise
        await _stop(process)
        raise DemoError(f"{name}: the echo backend process did not start listening")

    @property
    def key(self) -> str:
        """Its etcd key, ``echo/ADDRESS``."""
        return prefix_of(TARGET) + self.address

    async def register(self, etcd: EtcdConfig) -> None:
        """Register under ``echo/ADDRESS``; the registration lives until :meth:`deregister`."""
        registration = Registration(
            etcd, TARGET, self.address, ttl=LEASE_TTL_S, metadata={"id": self.name}
        )
        await self._registered.enter_async_context(registration)

    async def deregister(self) -> None:
        await self._registered.aclose()

    async def close(self) -> None:
        try:
            await self.deregister()
        finally:
            await _stop(self.process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it is still there after the grace time and a second."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(STOP_GRACE_S + 1 * SECONDS):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


class DemoClient:
    """Calls echo.Echo/UnaryEcho through the proxy every CALL_INTERVAL_S and says who answered.

    Once every backend has answered (see STOP_AFTER_CALLS) it awaits `stop_one` once.
    """

    def __init__(self, target: str, backends: int, stop_one: Callable[[], Awaitable[None]]) -> None:
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub: Any = echo_pb2_grpc.EchoStub(self.channel)
        self.backends = backends
        self.stop_one = stop_one
        self.calls = 0
        self.answers: Counter[str] = Counter()
        self.stopped = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        seen: set[str] = set()
        while True:
            started = loop.time()
            self.calls += 1
            backend = await self._call(self.calls)
            if backend:
                seen.add(backend)
            low, high = STOP_AFTER_CALLS
            all_seen = len(seen) == self.backends
            if not self.stopped and self.calls >= low and (all_seen or self.calls >= high):
                self.stopped = True
                await self.stop_one()
                started = loop.time()
            await asyncio.sleep(max(0.0, CALL_INTERVAL_S - (loop.time() - started)))

    async def _call(self, n: int) -> str:
        request = echo_pb2.EchoRequest(message=f"hello {n}")
        try:
            response = await asyncio.to_thread(self.stub.UnaryEcho, request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            say(f"call {n}: failed: {exc.code().name}: {exc.details()}")
            return ""
        backend = str(response.backend)
        self.answers[backend] += 1
        say(f"call {n}: answered by {backend}")
        return backend

    def close(self) -> None:
        # Also cancels a call still running in its worker thread.
        self.channel.close()


@dataclass
class Running:
    """What startup made; every part of it is already owned by the exit stack."""

    etcd: EmbeddedEtcd
    pool: PoolView
    backends: list[DemoBackend]
    address: str

    async def stop_one(self) -> None:
        """Take backend-2 out the way a backend should leave: deregister, then stop."""
        victim = self.backends[STOPPED]
        say(describe_pool(self.pool.pool.snapshot))
        say(
            f"stopping {victim.name} ({victim.address}): "
            f"ending its registration deletes {victim.key}"
        )
        await victim.deregister()
        in_pool = holds(victim)
        gone = await self.pool.wait_for(lambda snapshot: not in_pool(snapshot), POOL_TIMEOUT_S)
        if gone:
            say(
                f"{victim.name} left the pool; stopping its server: the next calls go to the others"
            )
        else:
            say(f"{victim.name} still in the pool after {POOL_TIMEOUT_S:g} s; stopping it anyway")
        await victim.close()


async def remove_leftovers(config: EtcdConfig) -> None:
    """Delete the keys under ``echo/`` that an earlier run could not delete.

    A Ctrl-C in a terminal reaches etcd too, which may then be gone before the backends
    deregister; a restarted etcd gives the leases of those keys a whole TTL again.
    """
    prefix = prefix_of(TARGET)
    async with EtcdClient(config) as client:
        _revision, kvs = await client.get_prefix(prefix)
        for kv in kvs:
            await client.delete(kv.key)
    if kvs:
        say(f"deleted {len(kvs)} key(s) under {prefix} left in etcd by an earlier run")


async def start(stack: contextlib.AsyncExitStack, args: argparse.Namespace) -> Running:
    """Start the backends, etcd, discovery and the proxy; each is pushed on `stack` at once."""
    # The backend processes first, before anything runs grpcio threads in this process: a fork
    # while they run makes grpcio print "skipping fork() handlers" on the demo's output.
    backends: list[DemoBackend] = []
    for name in BACKEND_NAMES:
        backend = await DemoBackend.serve(name)
        stack.push_async_callback(backend.close)
        backends.append(backend)

    etcd = EmbeddedEtcd(args.etcd_data_dir, args.etcd_port, etcd_peer_port(args.etcd_port))
    say(f"starting etcd on {etcd.endpoint} (embedded; data in {etcd.data_dir})")
    await stack.enter_async_context(etcd)
    say(f"etcd ready (log in {etcd.log_path})")
    config = etcd_config(etcd.endpoint)
    await remove_leftovers(config)

    discovery = EtcdDiscovery(config)
    view = PoolView(discovery.pool(TARGET))
    say(f"the proxy's pool is target {TARGET!r}: every key under {prefix_of(TARGET)} in etcd")
    await stack.enter_async_context(discovery)
    await discovery.wait_ready(POOL_TIMEOUT_S)

    for backend in backends:
        name = backend.name
        say(
            f"{name} serving at {backend.address}; registering it as {backend.key} "
            f"(lease TTL {LEASE_TTL_S} s, kept alive)"
        )
        await backend.register(config)
        await view.wait_for(holds(backend), POOL_TIMEOUT_S)
    addresses = {b.address for b in backends}
    if not await view.wait_for(lambda s: s.addresses == addresses, POOL_TIMEOUT_S):
        raise DemoError(
            f"after {POOL_TIMEOUT_S:g} s the pool is not the three backends: "
            + describe_pool(view.pool.snapshot)
        )

    host, port = args.listen
    # No access log: the demo prints its own line per call, which says the same.
    server = ProxyServer(Router(default=view.pool), options=ServerOptions(access_log_sample=0.0))
    stack.push_async_callback(server.close)
    try:
        bound = await server.listen(host, port)
    except OSError as exc:
        raise DemoError(f"cannot listen on {host}:{port}: {exc}") from exc
    # Pushed last, so it runs first: the pool's changes at exit are not the demo's story.
    stack.callback(view.mute)
    return Running(etcd, view, backends, dial_address(host, bound[0][1]))


async def until_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """The result of `work`, or Interrupted if `stop` is set first (`work` is cancelled)."""
    task = asyncio.create_task(work, name="demo startup")
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let its cleanup run before the caller's
    if task.cancelled():
        raise Interrupted
    return task.result()


async def demo(args: argparse.Namespace) -> int:
    """Run the demo until SIGINT/SIGTERM, or for `args.duration` seconds; 0 on a clean exit.

    `args.listen` is the proxy's (host, port), port 0 picks a free one; `args.etcd_port` and
    `args.etcd_data_dir` (None: the user's cache) place the embedded etcd.
    """
    duration_s: float | None = args.duration
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            running = await until_stopped(stop, start(stack, args))
            address = running.address
            say(
                f"proxy listening on {address}, balancing each call round robin over "
                f"the pool of {TARGET!r}"
            )
            for line in hints(address, echo_proto(), running.etcd.endpoint):
                say(line)
            until = f"for {duration_s:g} s" if duration_s is not None else "until Ctrl-C"
            say(f"a client calls echo.Echo/UnaryEcho through the proxy every 0.5 s, {until}")

            timer = loop.call_later(duration_s, stop.set) if duration_s is not None else None
            client = DemoClient(address, len(running.backends), running.stop_one)
            stack.callback(client.close)
            try:
                async with asyncio.TaskGroup() as tasks:
                    calls = tasks.create_task(client.run(), name="demo client")
                    await stop.wait()
                    calls.cancel()
            finally:
                if timer is not None:
                    timer.cancel()
            tally = ", ".join(f"{name} {n}" for name, n in sorted(client.answers.items()))
    except Interrupted:
        say("interrupted while starting; everything started is stopped")
        return 0
    except EmbeddedEtcdError as exc:
        print(f"demo: cannot run etcd: {exc}", file=sys.stderr)
        print("demo: --etcd-port and --etcd-data-dir place the demo's etcd", file=sys.stderr)
        return 1
    except (DemoError, EtcdError) as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    say(f"done: answers by backend: {tally or 'none'}")
    return 0
