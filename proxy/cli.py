"""The `grpc-etcd-proxy` command: serve, register, endpoints, demo.

`serve` takes its settings from a TOML file, the environment and flags (see proxy/app/config.py);
a bad one exits 2 with a message naming the setting and where it came from. The other
commands keep argparse's behaviour: a bad flag exits 2 naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from proxy import __version__
from proxy.app import config, logs
from proxy.app.config import ConfigError
from proxy.app.wiring import check_serve, etcd_options, etcd_problem, serve
from proxy.core import options

if TYPE_CHECKING:
    pass

log = structlog.get_logger("proxy.cli")

DEFAULT_LISTEN = "{}:{}".format(*options.DEFAULT_LISTEN)


def _arg(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A config converter as an argparse type: its message, not argparse's generic one."""

    def parse(value: str) -> Any:
        try:
            return convert(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = convert.__name__
    return parse


parse_hostport = _arg(config.hostport)


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


def _add_log_flags(parser: argparse.ArgumentParser, level: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        default=level,
        choices=logs.LEVELS,
        help="least severe level logged (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        choices=logs.FORMATS,
        help="log line format (default: console when stderr is a terminal, else json)",
    )


class _Version(argparse.Action):
    """--version, with which build of the data path runs (compiled or pure Python): found
    when asked, since finding it imports the data path."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from proxy.build_info import build_info

        print(f"{parser.prog} {__version__} ({build_info().describe()})")  # stdout, as argparse's
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpc-etcd-proxy",
        description="An L7 gRPC proxy: balances every call over backends found in etcd.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and build")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Every setting is also read from the TOML file given by "
        "--config (key: the flag's name with underscores) and from the environment "
        "(GRPC_ETCD_PROXY_<NAME>); flags win over variables, which win over the file. "
        "SIGHUP reloads routes and balancing from the file and the environment.",
    )
    config.add_serve_flags(serve)
    from proxy.app.supervisor import add_worker_flags

    add_worker_flags(serve)

    register = sub.add_parser(
        "register", help="register a backend in etcd under a kept-alive lease until a signal"
    )
    _add_etcd(register)
    register.add_argument("--target", required=True, metavar="NAME", help="service name")
    register.add_argument(
        "--addr",
        required=True,
        type=_arg(config.address),
        metavar="HOST:PORT",
        help="the backend's address",
    )
    register.add_argument(
        "--ttl",
        type=_arg(config.positive_int),
        default=10,
        metavar="S",
        help="lease TTL (default 10)",
    )
    register.add_argument(
        "--metadata", type=_metadata, default=None, metavar="JSON", help="endpoint metadata"
    )
    _add_log_flags(register)

    endpoints = sub.add_parser("endpoints", help="print a target's pool as the proxy sees it")
    _add_etcd(endpoints)
    endpoints.add_argument("--target", required=True, metavar="NAME", help="service name")
    endpoints.add_argument("--watch", action="store_true", help="print again at every change")
    _add_log_flags(endpoints, level="warning")

    demo = sub.add_parser(
        "demo", help="three echo backends, the proxy and a client that calls it, in one process"
    )
    demo.add_argument(
        "--listen",
        type=parse_hostport,
        default=config.hostport(DEFAULT_LISTEN),
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
        port = config.positive_int(value)
        if port > 65535:
            raise ValueError(f"expected a port (1-65535), got {value!r}")
        return port

    demo.add_argument(
        "--etcd-port",
        type=_arg(etcd_port),
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
    _add_log_flags(demo)
    return parser


# ---------------------------------------------------------------------------- other commands


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


def run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return main_serve(args)
    logs.configure(args.log_level, args.log_format)
    if args.command in ("register", "endpoints"):
        problem = etcd_problem(args, args.etcd, lambda field: "--" + field.replace("_", "-"))
        if problem:
            parser.error(problem)
    if args.command == "register":
        return run(register(args))
    if args.command == "endpoints":
        return run(endpoints(args))
    if args.command == "demo":
        if args.duration is not None and not 0 < args.duration < float("inf"):
            parser.error("demo: --duration must be a positive number of seconds")
        # The demo and its echo backends are the examples distribution, not the proxy's wheel
        # (`make venv` installs both; a container image has only the proxy).
        try:
            from proxy_examples.demo import demo
        except ImportError as exc:
            parser.error(
                f"demo: the demo ships in grpc-etcd-proxy-examples ({exc}); "
                "install it with `pip install ./examples` from a clone of the project"
            )
        return run(demo(args))
    parser.error(f"unknown command {args.command!r}")
    return 2


def main_serve(args: argparse.Namespace) -> int:
    from proxy.app.supervisor import worker_role

    role = worker_role(args)
    if role is not None and not role.prepare():
        return 1  # the supervisor is gone already
    # Until run_until_stopped handles it, a SIGHUP (a reload sent early) must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    flags = config.flag_values(args)
    try:
        cfg = config.load(flags, os.environ, check=check_serve)
    except ConfigError as exc:
        print(f"grpc-etcd-proxy: {exc}", file=sys.stderr)
        return 2
    logs.configure(
        cfg.log_level, cfg.log_format, fields=None if role is None else {"worker": role.index}
    )
    if cfg.workers > 1 and role is None:
        from proxy.app.supervisor import supervise

        return supervise(cfg, flags)
    return run(serve(cfg, flags, role))
