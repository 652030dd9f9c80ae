"""The `grpc-etcd-proxy` command: serve, register, endpoints, demo.

`serve` takes its settings from a TOML file, the environment and flags (see proxy/config.py);
a bad one exits 2 with a message naming the setting and where it came from. The other
commands keep argparse's behaviour: a bad flag exits 2 naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from proxy import __version__, config, logs
from proxy.balancing import Balancer
from proxy.config import ConfigError, ServeConfig, describe
from proxy.h2.limits import Limits
from proxy.pool.endpoints import TargetPool, static_pool
from proxy.routing import Router, with_fallback

if TYPE_CHECKING:
    from proxy.discovery.etcd_model import EtcdConfig
    from proxy.discovery.watcher import EtcdDiscovery
    from proxy.relay.server import ProxyServer, ServerOptions
    from proxy.supervisor import WorkerRole
    from proxy.tls import UpstreamTLS, UpstreamTLSFiles

log = structlog.get_logger("proxy.cli")

DEFAULT_LISTEN = "127.0.0.1:50051"
FIRST_LISTING_WAIT_S = 10.0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpc-etcd-proxy",
        description="An L7 gRPC proxy: balances every call over backends found in etcd.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    from proxy.supervisor import add_worker_flags

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


# ---------------------------------------------------------------------------- etcd


class _EtcdSettings(Protocol):
    @property
    def etcd_ca(self) -> str | None: ...
    @property
    def etcd_cert(self) -> str | None: ...
    @property
    def etcd_key(self) -> str | None: ...
    @property
    def etcd_user(self) -> str | None: ...
    @property
    def etcd_password(self) -> str | None: ...


def etcd_options(settings: _EtcdSettings, etcd: str) -> EtcdConfig:
    from proxy.discovery.etcd_model import etcd_config

    return etcd_config(
        etcd,
        ca_file=settings.etcd_ca,
        cert_file=settings.etcd_cert,
        key_file=settings.etcd_key,
        username=settings.etcd_user,
        password=settings.etcd_password if settings.etcd_user else None,
    )


def _etcd_problem(settings: _EtcdSettings, etcd: str | None, name: Callable[[str], str]) -> str:
    """What is wrong with the etcd settings ('' when nothing); `name` spells a setting."""
    if not etcd or etcd == "embedded":
        return ""
    if bool(settings.etcd_cert) != bool(settings.etcd_key):
        return f"{name('etcd_cert')} and {name('etcd_key')} go together"
    if settings.etcd_user and not settings.etcd_password:
        return (
            f"{name('etcd_user')} needs {name('etcd_password')} (or GRPC_ETCD_PROXY_ETCD_PASSWORD)"
        )
    for field in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = getattr(settings, field)
        if path and not os.path.isfile(path):
            return f"{name(field)}: no such file: {path}"
    try:
        etcd_options(settings, etcd)
    except ValueError as exc:
        return f"{name('etcd')}: {exc}"
    return ""


# ---------------------------------------------------------------------------- serve: config


def check_serve(cfg: ServeConfig) -> None:
    """The checks that need several settings at once; raises ConfigError."""

    def name(field: str) -> str:
        return describe(cfg, field)

    if not cfg.backend and not cfg.etcd:
        raise ConfigError("serve: give --etcd URL --target NAME, or --backend HOST:PORT")
    if cfg.etcd and not cfg.target and not cfg.route:
        raise ConfigError(f"serve: {name('etcd')} needs --target NAME or --route SERVICE=TARGET")
    if (cfg.target or cfg.route) and not cfg.etcd:
        raise ConfigError(f"serve: {name('target' if cfg.target else 'route')} needs --etcd URL")
    if cfg.health_check and (
        cfg.backend_tls_skip_verify or any(t.skip_verify for _, t in cfg.targets)
    ):
        raise ConfigError(
            f"serve: {name('health_check')} cannot skip certificate verification (grpcio, "
            f"which runs the checks, has no such option): drop {name('backend_tls_skip_verify')}"
            " or the health checks"
        )
    problem = _etcd_problem(cfg, cfg.etcd, name)
    if problem:
        raise ConfigError(f"serve: {problem}")
    try:
        balancer_of(cfg)
    except ValueError as exc:
        message = str(exc)
        for field in ("sticky_header", "pin_header", "bounded_load", "policy"):
            message = message.replace(field, name(field))
        raise ConfigError(f"serve: {message}") from None


def balancer_of(cfg: ServeConfig) -> Balancer:
    return Balancer(
        cfg.policy,
        sticky_header=cfg.sticky_header,
        pin_header=cfg.pin_header,
        bounded_load=cfg.bounded_load,
    )


def limits_of(cfg: ServeConfig) -> Limits:
    return Limits(
        max_concurrent_streams=cfg.max_concurrent_streams,
        max_header_list_size=cfg.max_header_list_size,
        stream_window=cfg.stream_window,
    )


def server_options(cfg: ServeConfig) -> ServerOptions:
    from proxy.relay.server import ServerOptions

    return ServerOptions(
        max_retries=cfg.max_retries,
        retry_budget_percent=cfg.retry_budget_percent,
        retry_budget_min=cfg.retry_budget_min,
        outlier_consecutive_failures=cfg.outlier_consecutive_failures,
        outlier_base_ejection_s=cfg.outlier_base_ejection,
        outlier_max_ejection_s=cfg.outlier_max_ejection,
        outlier_max_ejection_percent=cfg.outlier_max_ejection_percent,
        access_log_sample=cfg.access_log_sample,
        tls_handshake_timeout_s=cfg.tls_handshake_timeout,
        tls_max_pending_handshakes=cfg.tls_max_pending_handshakes,
    )


# ---------------------------------------------------------------------------- serve: TLS


@dataclass(frozen=True, slots=True)
class TLSContexts:
    """The contexts a config makes: the listeners' (None: no TLS listener), the backends'
    default and per target (None: cleartext)."""

    listener: ssl.SSLContext | None
    upstream: UpstreamTLS | None
    per_target: dict[str, UpstreamTLS | None]

    @property
    def any(self) -> bool:
        return (
            self.listener is not None or self.upstream is not None or any(self.per_target.values())
        )


def tls_contexts(cfg: ServeConfig) -> TLSContexts:
    """Reads every certificate, key and CA file the config names; raises ConfigError naming
    the setting and the file."""
    from proxy import tls

    try:
        listener = None
        if any(cfg.is_tls(address) for address in cfg.listen) and cfg.tls_cert and cfg.tls_key:
            listener = tls.server_context(
                tls.ServerTLSFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            )
        built: dict[tls.UpstreamTLSFiles, tls.UpstreamTLS] = {}

        def upstream(over: config.BackendTLS) -> tls.UpstreamTLS | None:
            def pick(value: Any, default: Any) -> Any:
                return default if value is None else value

            if not pick(over.enabled, cfg.backend_tls):
                return None
            files = tls.UpstreamTLSFiles(
                ca=pick(over.ca, cfg.backend_ca),
                cert=pick(over.cert, cfg.backend_cert),
                key=pick(over.key, cfg.backend_key),
                server_name=pick(over.server_name, cfg.backend_server_name),
                skip_verify=pick(over.skip_verify, cfg.backend_tls_skip_verify),
            )
            if files not in built:  # targets with the same settings share one context
                built[files] = tls.upstream_context(files)
            return built[files]

        default = upstream(config.BackendTLS())
        per_target = {name.rstrip("/"): upstream(over) for name, over in cfg.targets}
    except tls.TLSFileError as exc:
        settings = exc.setting.split("/")
        where = " / ".join(describe(cfg, s) if s in config.BY_NAME else s for s in settings)
        if settings[0] not in ("tls_cert", "tls_key", "tls_client_ca") and cfg.targets:
            where += " (or a [targets] table)"
        path = f"{exc.path}: " if exc.path else ""
        raise ConfigError(f"serve: {where}: {path}{exc.reason}") from None
    return TLSContexts(listener, default, per_target)


def _files(tls: UpstreamTLS | None) -> UpstreamTLSFiles | None:
    return None if tls is None else tls.files


def allowed_of(cfg: ServeConfig) -> dict[str, frozenset[str]]:
    allowed: dict[str, set[str]] = {}
    for service, identity in cfg.route_allow:
        allowed.setdefault(service, set()).add(identity)
    return {service: frozenset(ids) for service, ids in allowed.items()}


def apply_tls(server: ProxyServer, cfg: ServeConfig, contexts: TLSContexts) -> None:
    if contexts.listener is not None:
        server.set_listener_tls(contexts.listener)
    server.set_upstream_tls(contexts.upstream, contexts.per_target)
    server.allowed = allowed_of(cfg)
    unverified = [
        name
        for name, ctx in [("*", contexts.upstream), *contexts.per_target.items()]
        if ctx is not None and ctx.files.skip_verify
    ]
    if unverified:
        log.warning(
            "backend_tls_verification_off",
            targets=unverified,
            detail="backend certificates are NOT verified (backend_tls_skip_verify): anyone "
            "on the path can impersonate these backends",
        )


class Pools:
    """Builds the router of a config, reusing the pools of earlier ones: a reload must not
    start a second watch of a target, nor pile up fallback pools on the same watch."""

    def __init__(self, discovery: EtcdDiscovery | None) -> None:
        self.discovery = discovery
        self._static: dict[tuple[str, ...], TargetPool] = {}
        self._fallback: dict[tuple[str, tuple[str, ...]], TargetPool] = {}

    def router(self, cfg: ServeConfig) -> Router:
        static = self._static_pool(cfg.backend) if cfg.backend else None
        default: TargetPool | None = static
        routes: dict[str, TargetPool] = {}
        discovery = self.discovery
        if discovery is not None:
            if cfg.target:
                default = discovery.pool(cfg.target)
                if static is not None:
                    key = (cfg.target, cfg.backend)
                    if key not in self._fallback:
                        self._fallback[key] = with_fallback(default, static)
                    default = self._fallback[key]
            routes = {service: discovery.pool(target) for service, target in cfg.route}
        return Router(default=default, routes=routes)

    @staticmethod
    def targets(cfg: ServeConfig) -> set[str]:
        """The etcd targets ``cfg`` routes to."""
        names = {target for _service, target in cfg.route}
        if cfg.target:
            names.add(cfg.target)
        return names

    def forget(self, targets: Iterable[str]) -> None:
        """Drop the fallback pools built on targets that are no longer watched."""
        gone = {target.rstrip("/") for target in targets}
        for key in [key for key in self._fallback if key[0].rstrip("/") in gone]:
            del self._fallback[key]

    def _static_pool(self, backends: tuple[str, ...]) -> TargetPool:
        pool = self._static.get(backends)
        if pool is None:
            pool = self._static[backends] = static_pool("static", backends)
        return pool


# ---------------------------------------------------------------------------- serve: reload


class Reloader:
    """SIGHUP: read the file and the environment again (the flags given at start still win),
    check, and apply what can change while calls run. A bad config is logged and ignored."""

    def __init__(
        self,
        cfg: ServeConfig,
        flags: dict[str, Any],
        server: ProxyServer,
        pools: Pools,
        environ: Callable[[], dict[str, str]] = lambda: dict(os.environ),
    ) -> None:
        self.current = cfg
        self.flags = flags
        self.server = server
        self.pools = pools
        self.environ = environ
        self._lock = asyncio.Lock()  # two quick SIGHUPs apply one after the other

    async def __call__(self) -> None:
        await self.reload()

    async def reload(self) -> bool:
        """True when the new settings were applied (even if they changed nothing)."""
        async with self._lock:
            new = self._read()
            if new is None:
                return False
            try:
                # Every file again, even if no setting changed: that is how a renewed
                # certificate reaches new connections.
                contexts = tls_contexts(new)
            except ConfigError as exc:
                log.error("config.reload_failed", error=str(exc), kept="the running configuration")
                return False
            router = self.pools.router(new)
            discovery = self.pools.discovery
            if discovery is not None:
                # A target watched for the first time has no endpoint until its first
                # listing: moving calls to it before would fail them.
                await discovery.wait_ready(FIRST_LISTING_WAIT_S)
            applied = config.changed(self.current, new)
            self.server.reconfigure(router, balancer_of(new))
            apply_tls(self.server, new, contexts)
            if discovery is not None:
                # After the swap: no new call picks from a dropped target's pool any more.
                dropped = await discovery.retain(self.pools.targets(new))
                if dropped:
                    self.pools.forget(dropped)
                    log.info("discovery.targets_dropped", targets=dropped)
            if new.access_log_sample != self.current.access_log_sample:
                self.server.set_access_log_sample(new.access_log_sample)
            self.current = new
            log.info("config.reloaded", changed=applied, tls_files_reread=contexts.any)
            return True

    def _read(self) -> ServeConfig | None:
        """The new config, with the running values of what needs a restart; None if bad."""
        try:
            new = config.load(self.flags, self.environ(), check=check_serve)
            fixed = [n for n in config.changed(self.current, new) if n not in config.RELOADABLE]
            if fixed:
                log.warning(
                    "config.restart_needed",
                    settings=fixed,
                    detail="these settings keep their running values until a restart",
                )
                new = config.replace(new, **{n: getattr(self.current, n) for n in fixed})
                check_serve(new)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), kept="the running configuration")
            return None
        return new


# ---------------------------------------------------------------------------- serve: run


async def serve(cfg: ServeConfig, flags: dict[str, Any], role: WorkerRole | None = None) -> int:
    """Run the proxy until a signal stops it; `role` when this process is a supervisor's
    worker (its admin endpoint is then a unix socket the supervisor reads)."""
    from proxy.relay.server import ProxyServer

    try:
        contexts = tls_contexts(cfg)
    except ConfigError as exc:
        print(f"grpc-etcd-proxy: {exc}", file=sys.stderr)
        return 2
    async with contextlib.AsyncExitStack() as stack:
        discovery: EtcdDiscovery | None = None
        if cfg.etcd:
            from proxy.discovery.embedded import EmbeddedEtcd, EmbeddedEtcdError
            from proxy.discovery.watcher import EtcdDiscovery

            etcd = cfg.etcd
            if etcd == "embedded":
                try:
                    embedded = await stack.enter_async_context(EmbeddedEtcd())
                except EmbeddedEtcdError as exc:
                    print(f"grpc-etcd-proxy: embedded etcd: {exc}", file=sys.stderr)
                    return 1
                etcd = embedded.endpoint
            discovery = EtcdDiscovery(etcd_options(cfg, etcd))
            # Serve at once: calls that come before the first listing get UNAVAILABLE with
            # the reason, rather than a refused connection.
            await stack.enter_async_context(discovery)
        pools = Pools(discovery)
        server = ProxyServer(
            pools.router(cfg), limits_of(cfg), server_options(cfg), balancer_of(cfg)
        )
        server.discovery = discovery
        apply_tls(server, cfg, contexts)
        stack.push_async_callback(server.close)
        if role is not None:
            await role.start_admin(stack, server)
        elif cfg.admin is not None and not await _start_admin(stack, server, cfg.admin):
            return 1
        if cfg.health_check:
            from proxy.health.active import ActiveHealth

            health = ActiveHealth(
                # Re-read at every rescan, so a SIGHUP that swaps the router is followed.
                lambda: server.router.pools(),
                interval_s=cfg.health_check_interval,
                timeout_s=cfg.health_check_timeout,
                service=cfg.health_check_service,
                tls_of=lambda target: _files(server.target_tls.get(target, server.upstream_tls)),
            )
            server.health = health
            health.start()
            stack.push_async_callback(health.close)
        for address in cfg.listen:
            if address.path is not None:
                await server.listen_unix(address.path)
            else:
                await server.listen(
                    address.host,
                    address.port,
                    reuse_port=role is not None,
                    tls=contexts.listener if cfg.is_tls(address) else None,
                )
        _tune_gc()
        from proxy.lifecycle import run_until_stopped

        return await run_until_stopped(
            server, cfg.drain_timeout, Reloader(cfg, flags, server, pools)
        )
    return 0


async def _start_admin(
    stack: contextlib.AsyncExitStack, server: ProxyServer, address: tuple[str, int]
) -> bool:
    from proxy.admin.app import ServerAdmin
    from proxy.admin.http import admin_on

    hint = " (another proxy may be using it: give each its own --admin HOST:PORT, or --admin off)"
    return await admin_on(stack, ServerAdmin(server), *address, hint=hint)


def _tune_gc() -> None:
    """Calls free their objects by reference counting; the cyclic collector only costs time on
    the hot path (a generation-0 pass every 700 allocations is every few dozen calls). Keep
    what start-up made out of its way, and run it a hundred times less often."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)


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
        problem = _etcd_problem(args, args.etcd, lambda field: "--" + field.replace("_", "-"))
        if problem:
            parser.error(problem)
    if args.command == "register":
        return run(register(args))
    if args.command == "endpoints":
        return run(endpoints(args))
    if args.command == "demo":
        if args.duration is not None and not 0 < args.duration < float("inf"):
            parser.error("demo: --duration must be a positive number of seconds")
        from proxy.demo import demo  # imports grpcio, which `serve` does not need

        return run(demo(args))
    parser.error(f"unknown command {args.command!r}")
    return 2


def main_serve(args: argparse.Namespace) -> int:
    from proxy.supervisor import worker_role

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
        from proxy.supervisor import supervise

        return supervise(cfg, flags)
    return run(serve(cfg, flags, role))
