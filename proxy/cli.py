"""The `grpc-etcd-proxy` command: serve, register, endpoints, demo.

Bad flags exit 2 with a message naming the flag (argparse's behaviour, kept for our own checks
through `parser.error`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from proxy import __version__
from proxy.balancing import Balancer
from proxy.h2.limits import Limits
from proxy.pool.endpoints import TargetPool, static_pool
from proxy.relay.server import ProxyServer, ServerOptions
from proxy.routing import Router, with_fallback

if TYPE_CHECKING:
    from proxy.discovery.etcd_model import EtcdConfig

DEFAULT_LISTEN = "127.0.0.1:50051"
_LIMITS = Limits()
_OPTIONS = ServerOptions()


def parse_hostport(value: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def _address(value: str) -> str:
    host, port = parse_hostport(value)
    if port == 0:
        raise argparse.ArgumentTypeError(f"backend port must not be 0: {value!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _route(value: str) -> tuple[str, str]:
    service, sep, target = value.partition("=")
    if not sep or not service.strip() or not target.strip():
        raise argparse.ArgumentTypeError(f"expected SERVICE=TARGET, got {value!r}")
    return service.strip(), target.strip()


def _metadata(value: str) -> Any:
    from proxy.discovery.commands import parse_metadata

    try:
        return parse_metadata(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_etcd(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--etcd", required=True, metavar="URL[,URL...]", help="etcd endpoints, comma-separated"
    )
    _add_etcd_security(parser)


def _add_etcd_security(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("etcd security")
    group.add_argument("--etcd-ca", metavar="FILE", help="CA certificate to verify etcd")
    group.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd")
    group.add_argument("--etcd-key", metavar="FILE", help="client key for etcd")
    group.add_argument("--etcd-user", metavar="NAME", help="etcd username")
    group.add_argument(
        "--etcd-password",
        metavar="PASSWORD",
        default=os.environ.get("GRPC_ETCD_PROXY_ETCD_PASSWORD"),
        help="etcd password (better: the GRPC_ETCD_PROXY_ETCD_PASSWORD environment variable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpc-etcd-proxy",
        description="An L7 gRPC proxy: balances every call over backends found in etcd.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--listen",
        type=parse_hostport,
        default=parse_hostport(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"listen on (default {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--backend",
        type=_address,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a static backend (repeatable)",
    )
    serve.add_argument(
        "--max-concurrent-streams",
        type=_positive_int,
        default=_LIMITS.max_concurrent_streams,
        metavar="N",
        help="streams per client connection (default %(default)s)",
    )
    serve.add_argument(
        "--max-header-list-size",
        type=_positive_int,
        default=_LIMITS.max_header_list_size,
        metavar="BYTES",
        help="decoded header list limit (default %(default)s)",
    )
    serve.add_argument(
        "--stream-window",
        type=_positive_int,
        default=_LIMITS.stream_window,
        metavar="BYTES",
        help="per-stream flow-control window, the most "
        "buffered per stream and direction (default %(default)s)",
    )
    serve.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=_OPTIONS.max_attempts,
        metavar="N",
        help="backends tried for a call that reached none (default %(default)s)",
    )
    serve.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="etcd endpoints (host:port or http(s)://host:port), or 'embedded' to run a local "
        "etcd on 127.0.0.1:2379 with its data under the user's cache",
    )
    serve.add_argument(
        "--target",
        metavar="NAME",
        help="the default pool: every key under NAME/ in etcd (what etcd:///NAME means to Go)",
    )
    serve.add_argument(
        "--route",
        type=_route,
        action="append",
        default=[],
        metavar="SERVICE=TARGET",
        help="send calls of this gRPC service (pkg.Service) to this target's pool (repeatable)",
    )
    _add_etcd_security(serve)
    balancing = serve.add_argument_group("balancing")
    balancing.add_argument(
        "--policy",
        choices=["round_robin", "least_request", "random"],
        default="round_robin",
        help="per-call policy (default round_robin); weights come from `weight` in metadata",
    )
    balancing.add_argument(
        "--sticky-header",
        metavar="NAME",
        help="consistent hashing on this request header: one key, one backend, in every replica",
    )
    balancing.add_argument(
        "--bounded-load",
        type=float,
        metavar="FACTOR",
        help="with --sticky-header: a key whose backend has more than FACTOR x the average "
        "calls in flight goes to the next one on the ring (off by default; e.g. 1.25)",
    )
    balancing.add_argument(
        "--pin-header",
        metavar="NAME",
        help="this header names one instance (metadata id, last key segment or address); "
        "the call goes there or fails with UNAVAILABLE",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    register = sub.add_parser(
        "register", help="register a backend in etcd under a kept-alive lease until a signal"
    )
    _add_etcd(register)
    register.add_argument("--target", required=True, metavar="NAME", help="service name")
    register.add_argument(
        "--addr", required=True, type=_address, metavar="HOST:PORT", help="the backend's address"
    )
    register.add_argument(
        "--ttl", type=_positive_int, default=10, metavar="S", help="lease TTL (default 10)"
    )
    register.add_argument(
        "--metadata", type=_metadata, default=None, metavar="JSON", help="endpoint metadata"
    )
    register.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )

    endpoints = sub.add_parser("endpoints", help="print a target's pool as the proxy sees it")
    _add_etcd(endpoints)
    endpoints.add_argument("--target", required=True, metavar="NAME", help="service name")
    endpoints.add_argument("--watch", action="store_true", help="print again at every change")
    endpoints.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )

    demo = sub.add_parser(
        "demo", help="three echo backends, the proxy and a client that calls it, in one process"
    )
    demo.add_argument(
        "--listen",
        type=parse_hostport,
        default=parse_hostport(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"the proxy listens on (default {DEFAULT_LISTEN})",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="exit 0 after S seconds (default: run until Ctrl-C)",
    )

    def etcd_port(value: str) -> int:
        port = _positive_int(value)
        if port > 65535:
            raise argparse.ArgumentTypeError(f"expected a port (1-65535), got {value!r}")
        return port

    demo.add_argument(
        "--etcd-port",
        type=etcd_port,
        default=2379,
        metavar="PORT",
        help="client port of the demo's embedded etcd, on 127.0.0.1 (default %(default)s)",
    )
    demo.add_argument(
        "--etcd-data-dir",
        default=None,
        metavar="DIR",
        help="data directory of the demo's embedded etcd "
        "(default: grpc-etcd-proxy/etcd in the user's cache directory)",
    )
    return parser


def configure_logging(level: str) -> None:
    import logging

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        cache_logger_on_first_use=True,
    )


def etcd_options(args: argparse.Namespace, etcd: str) -> EtcdConfig:
    from proxy.discovery.etcd_model import etcd_config

    return etcd_config(
        etcd,
        ca_file=args.etcd_ca,
        cert_file=args.etcd_cert,
        key_file=args.etcd_key,
        username=args.etcd_user,
        password=args.etcd_password if args.etcd_user else None,
    )


async def serve(args: argparse.Namespace) -> int:
    limits = Limits(
        max_concurrent_streams=args.max_concurrent_streams,
        max_header_list_size=args.max_header_list_size,
        stream_window=args.stream_window,
    )
    async with contextlib.AsyncExitStack() as stack:
        static = static_pool("static", args.backend) if args.backend else None
        default: TargetPool | None = static
        routes: dict[str, TargetPool] = {}
        if args.etcd:
            from proxy.discovery.embedded import EmbeddedEtcd, EmbeddedEtcdError
            from proxy.discovery.watcher import EtcdDiscovery

            etcd = args.etcd
            if etcd == "embedded":
                try:
                    embedded = await stack.enter_async_context(EmbeddedEtcd())
                except EmbeddedEtcdError as exc:
                    print(f"grpc-etcd-proxy: embedded etcd: {exc}", file=sys.stderr)
                    return 1
                etcd = embedded.endpoint
            targets = [t for t in [args.target, *(t for _, t in args.route)] if t]
            discovery = EtcdDiscovery(etcd_options(args, etcd), targets)
            await stack.enter_async_context(discovery)
            if args.target:
                default = discovery.pool(args.target)
                if static is not None:
                    default = with_fallback(default, static)
            routes = {service: discovery.pool(target) for service, target in args.route}
            # Serve at once: calls that come before the first listing get UNAVAILABLE with
            # the reason, rather than a refused connection.
        router = Router(default=default, routes=routes)
        server = ProxyServer(
            router,
            limits,
            ServerOptions(max_attempts=args.max_attempts),
            balancer_from_args(args),
        )
        stack.push_async_callback(server.close)
        host, port = args.listen
        await server.listen(host, port)
        _tune_gc()
        await _wait_for_signal()
    return 0


def _tune_gc() -> None:
    """Calls free their objects by reference counting; the cyclic collector only costs time on
    the hot path (a generation-0 pass every 700 allocations is every few dozen calls). Keep
    what start-up made out of its way, and run it a hundred times less often."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def register(args: argparse.Namespace) -> int:
    from proxy.discovery.commands import run_register

    return await run_register(
        etcd_options(args, args.etcd),
        args.target,
        args.addr,
        ttl=args.ttl,
        metadata=args.metadata,
    )


async def endpoints(args: argparse.Namespace) -> int:
    from proxy.discovery.commands import run_endpoints

    return await run_endpoints(etcd_options(args, args.etcd), args.target, watch=args.watch)


def run(coro_fn: object, args: argparse.Namespace) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro_fn(args)))  # type: ignore[operator]
    except ImportError:
        return int(asyncio.run(coro_fn(args)))  # type: ignore[operator]


def balancer_from_args(args: argparse.Namespace) -> Balancer:
    return Balancer(
        args.policy,
        sticky_header=args.sticky_header,
        pin_header=args.pin_header,
        bounded_load=args.bounded_load,
    )


def _check_etcd_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate etcd flags up front, so a bad one exits 2 naming it, not at first use."""
    if not args.etcd or args.etcd == "embedded":
        return
    if bool(args.etcd_cert) != bool(args.etcd_key):
        parser.error("--etcd-cert and --etcd-key go together")
    if args.etcd_user and not args.etcd_password:
        parser.error("--etcd-user needs --etcd-password (or GRPC_ETCD_PROXY_ETCD_PASSWORD)")
    for name in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.error(f"--{name.replace('_', '-')}: no such file: {path}")
    try:
        etcd_options(args, args.etcd)
    except ValueError as exc:
        parser.error(f"--etcd: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    if args.command in ("serve", "register", "endpoints"):
        _check_etcd_flags(parser, args)
    if args.command == "serve":
        if not args.backend and not args.etcd:
            parser.error("serve: give --etcd URL --target NAME, or --backend HOST:PORT")
        if args.etcd and not args.target and not args.route:
            parser.error("serve: --etcd needs --target NAME or --route SERVICE=TARGET")
        if (args.target or args.route) and not args.etcd:
            parser.error("serve: --target and --route need --etcd URL")
        try:
            balancer_from_args(args)
        except ValueError as exc:
            message = str(exc)
            for option in ("sticky_header", "pin_header", "bounded_load", "policy"):
                message = message.replace(option, "--" + option.replace("_", "-"))
            parser.error(f"serve: {message}")
        return run(serve, args)
    if args.command == "register":
        return run(register, args)
    if args.command == "endpoints":
        return run(endpoints, args)
    if args.command == "demo":
        if args.duration is not None and not 0 < args.duration < float("inf"):
            parser.error("demo: --duration must be a positive number of seconds")
        from proxy.demo import demo  # imports grpcio, which `serve` does not need

        return run(demo, args)
    parser.error(f"unknown command {args.command!r}")
    return 2
