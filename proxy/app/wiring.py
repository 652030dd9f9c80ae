"""The composition root of `serve`: settings in, a running proxy out.

`serve()` builds the router, balancer and TLS contexts from a `ServeConfig`, starts discovery,
health checks and the admin endpoint, listens, and runs until stopped; `Reloader` applies a
SIGHUP (config file, routes, TLS files) to the running proxy. The command line (proxy.cli)
only parses flags and calls in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from proxy import __version__
from proxy.app import config
from proxy.app.config import ConfigError, ServeConfig, describe
from proxy.core.balancing import Balancer
from proxy.core.endpoints import TargetPool, static_pool
from proxy.core.h2.limits import Limits
from proxy.core.routing import Router, with_fallback

if TYPE_CHECKING:
    from proxy.app.supervisor import WorkerRole
    from proxy.discovery.etcd_model import EtcdConfig
    from proxy.discovery.watcher import EtcdDiscovery
    from proxy.runtime.server import ProxyServer
    from proxy.runtime.tls import UpstreamTLS, UpstreamTLSFiles

log = structlog.get_logger("proxy.cli")

FIRST_LISTING_WAIT_S = 10.0


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


def etcd_problem(settings: _EtcdSettings, etcd: str | None, name: Callable[[str], str]) -> str:
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
    if cfg.base_stream_window > cfg.stream_window:
        raise ConfigError(
            f"serve: {name('base_stream_window')} ({cfg.base_stream_window}) must not be "
            f"above {name('stream_window')} ({cfg.stream_window}): calls grow it up to that"
        )
    problem = etcd_problem(cfg, cfg.etcd, name)
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
    from proxy.runtime import tls

    try:
        listener = None
        if any(cfg.is_tls(address) for address in cfg.listen) and cfg.tls_cert and cfg.tls_key:
            listener = tls.server_context(
                tls.ServerTLSFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca),
                http1=cfg.grpc_web,
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
        server.listeners.set_listener_tls(contexts.listener)
    server.dispatcher.set_upstream_tls(contexts.upstream, contexts.per_target)
    server.dispatcher.allowed = allowed_of(cfg)
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
            self.server.dispatcher.reconfigure(router, balancer_of(new))
            apply_tls(self.server, new, contexts)
            if discovery is not None:
                # After the swap: no new call picks from a dropped target's pool any more.
                dropped = await discovery.retain(self.pools.targets(new))
                if dropped:
                    self.pools.forget(dropped)
                    log.info("discovery.targets_dropped", targets=dropped)
            if new.access_log_sample != self.current.access_log_sample:
                self.server.dispatcher.set_access_log_sample(new.access_log_sample)
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
    from proxy.build_info import build_info
    from proxy.runtime.server import ProxyServer

    try:
        contexts = tls_contexts(cfg)
    except ConfigError as exc:
        print(f"grpc-etcd-proxy: {exc}", file=sys.stderr)
        return 2
    build = build_info()
    # Which data path runs: a compiled build that fell back to pure Python (no compiler at
    # install time) is slower, and a stale one runs code older than its source.
    log.info("starting", version=__version__, build=build.describe())
    if build.stale or build.kind == "mixed":
        log.warning("build_inconsistent", build=build.describe())
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
            pools.router(cfg),
            limits_of(cfg),
            cfg.server_options(),
            balancer_of(cfg),
            discovery=discovery,
        )
        apply_tls(server, cfg, contexts)
        stack.push_async_callback(server.close)
        if role is not None:
            await role.start_admin(stack, server)
        elif cfg.admin is not None and not await _start_admin(stack, server, cfg.admin):
            return 1
        if cfg.health_check:
            from proxy.runtime.health_checks import ActiveHealth

            health = ActiveHealth(
                # Re-read at every rescan, so a SIGHUP that swaps the router is followed.
                lambda: server.dispatcher.router.pools(),
                cfg.health_check_options(),
                tls_of=lambda target: _files(
                    server.dispatcher.target_tls.get(target, server.dispatcher.upstream_tls)
                ),
            )
            server.dispatcher.health = health
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
        from proxy.app.lifecycle import run_until_stopped

        return await run_until_stopped(
            server, cfg.drain_timeout, Reloader(cfg, flags, server, pools)
        )
    return 0


async def _start_admin(
    stack: contextlib.AsyncExitStack, server: ProxyServer, address: tuple[str, int]
) -> bool:
    from proxy.ops.admin.app import ServerAdmin
    from proxy.ops.admin.http import admin_on

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
