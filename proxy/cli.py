"""The `grpc-etcd-proxy` command: serve, register, endpoints, demo.

Bad flags exit 2 with a message naming the flag (argparse's behaviour, kept for our own checks
through `parser.error`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import structlog

from proxy import __version__
from proxy.h2.limits import Limits
from proxy.pool.endpoints import static_pool
from proxy.relay.server import ProxyServer, ServerOptions
from proxy.routing import Router

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
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

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


async def serve(args: argparse.Namespace) -> int:
    limits = Limits(
        max_concurrent_streams=args.max_concurrent_streams,
        max_header_list_size=args.max_header_list_size,
        stream_window=args.stream_window,
    )
    router = Router(default=static_pool("static", args.backend))
    server = ProxyServer(router, limits, ServerOptions(max_attempts=args.max_attempts))
    host, port = args.listen
    await server.listen(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    return 0


def run(coro_fn: object, args: argparse.Namespace) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro_fn(args)))  # type: ignore[operator]
    except ImportError:
        return int(asyncio.run(coro_fn(args)))  # type: ignore[operator]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    if args.command == "serve":
        if not args.backend:
            parser.error("serve: give at least one --backend HOST:PORT")
        return run(serve, args)
    if args.command == "demo":
        if args.duration is not None and not 0 < args.duration < float("inf"):
            parser.error("demo: --duration must be a positive number of seconds")
        from proxy.demo import demo  # imports grpcio, which `serve` does not need

        return run(demo, args)
    parser.error(f"unknown command {args.command!r}")
    return 2
