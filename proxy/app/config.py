"""The `serve` configuration: one table of settings, read from a TOML file, the environment and
the command line, in that order of precedence (a flag wins over a variable, which wins over the
file, which wins over the default).

Every setting is described once, in `SETTINGS`: its converter (a string in, a value out, or a
ValueError saying what was expected), its help and where it may come from. The flags, the
environment variables (`GRPC_ETCD_PROXY_<NAME>`) and the TOML keys (`name`) are all generated
from that table, so the three sources accept the same values and reject them with the same
words. A bad value, an unknown TOML key or an unknown `GRPC_ETCD_PROXY_*` variable raises
`ConfigError`, which names the setting and where it came from; the CLI exits 2 with it.

Lists (`backend`, `route`) come whole from one source: `--backend` given once replaces the
file's list, it does not add to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from proxy.core.h2.limits import Limits
from proxy.core.options import DEFAULT_LISTEN, HealthCheckOptions, ServerOptions

ENV_PREFIX = "GRPC_ETCD_PROXY_"
DEFAULT_ADMIN = ("127.0.0.1", 9901)
POLICIES = ("round_robin", "least_request", "random")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")

_LIMITS = Limits()
_OPTIONS = ServerOptions()
_HEALTH = HealthCheckOptions()

HostPort = tuple[str, int]
Route = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener. `tls` None (a bare HOST:PORT) means TLS when `tls_cert` is set (see
    `ServeConfig.is_tls`). `path`: a Unix socket."""

    host: str = ""
    port: int = 0
    path: str | None = None
    tls: bool | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = {None: "", True: "tls:", False: "h2c:"}[self.tls]
        return f"{scheme}{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BackendTLS:
    """TLS towards one target's backends; a field left None in a `[targets.NAME]` table takes
    the value of the top-level `backend_*` setting."""

    enabled: bool | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    skip_verify: bool | None = None


DEFAULT_LISTEN_ADDRESS = ListenAddress(*DEFAULT_LISTEN)
# The keys of a [targets.NAME] table, and the BackendTLS field each sets.
TARGET_KEYS = {
    "backend_tls": "enabled",
    "backend_ca": "ca",
    "backend_cert": "cert",
    "backend_key": "key",
    "backend_server_name": "server_name",
    "backend_tls_skip_verify": "skip_verify",
}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `serve` runs with; `sources` says where each value came from (see
    `ConfigLoader.describe`)."""

    listen: tuple[ListenAddress, ...] = (DEFAULT_LISTEN_ADDRESS,)
    backend: tuple[str, ...] = ()
    etcd: str | None = None
    target: str | None = None
    route: tuple[Route, ...] = ()
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    policy: str = "round_robin"
    sticky_header: str | None = None
    bounded_load: float | None = None
    pin_header: str | None = None
    route_allow: tuple[Route, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_handshake_timeout: float = _OPTIONS.tls_handshake_timeout
    tls_max_pending_handshakes: int = _OPTIONS.tls_max_pending_handshakes
    backend_tls: bool = False
    backend_ca: str | None = None
    backend_cert: str | None = None
    backend_key: str | None = None
    backend_server_name: str | None = None
    backend_tls_skip_verify: bool = False
    targets: tuple[tuple[str, BackendTLS], ...] = ()
    max_concurrent_streams: int = _LIMITS.max_concurrent_streams
    max_header_list_size: int = _LIMITS.max_header_list_size
    stream_window: int = _LIMITS.stream_window
    buffer_budget: int = _OPTIONS.buffer_budget
    connection_buffer: int = _OPTIONS.connection_buffer
    base_stream_window: int = _OPTIONS.base_stream_window
    stalled_stream_timeout: float = _OPTIONS.stalled_stream_timeout
    max_connections: int = _OPTIONS.max_connections
    idle_timeout: float = _OPTIONS.idle_timeout
    preface_timeout: float = _OPTIONS.preface_timeout
    grpc_web: bool = _OPTIONS.grpc_web
    cors_allowed_origins: tuple[str, ...] = _OPTIONS.cors_allowed_origins
    cors_allow_headers: tuple[str, ...] = _OPTIONS.cors_allow_headers
    cors_expose_headers: tuple[str, ...] = _OPTIONS.cors_expose_headers
    http1_max_header_size: int = _OPTIONS.http1_max_header_size
    http1_max_request_line: int = _OPTIONS.http1_max_request_line
    http1_max_body_size: int = _OPTIONS.http1_max_body_size
    max_retries: int = _OPTIONS.max_retries
    retry_budget_percent: float = _OPTIONS.retry_budget_percent
    retry_budget_min: int = _OPTIONS.retry_budget_min
    outlier_consecutive_failures: int = _OPTIONS.outlier_consecutive_failures
    outlier_base_ejection: float = _OPTIONS.outlier_base_ejection
    outlier_max_ejection: float = _OPTIONS.outlier_max_ejection
    outlier_max_ejection_percent: float = _OPTIONS.outlier_max_ejection_percent
    health_check: bool = False
    health_check_interval: float = _HEALTH.interval
    health_check_timeout: float = _HEALTH.timeout
    health_check_service: str = _HEALTH.service
    drain_timeout: float = 30.0
    admin: HostPort | None = DEFAULT_ADMIN
    workers: int = 1
    log_format: str | None = None
    log_level: str = "info"
    access_log_sample: float = _OPTIONS.access_log_sample
    config: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def server_options(self) -> ServerOptions:
        """The runtime's options: every field of ServerOptions from the setting of its name
        (the rest keep their defaults)."""
        names = ServerOptions.__dataclass_fields__.keys() & ServeConfig.__dataclass_fields__.keys()
        return ServerOptions(**{name: getattr(self, name) for name in names})

    def health_check_options(self) -> HealthCheckOptions:
        return HealthCheckOptions(
            self.health_check_interval, self.health_check_timeout, self.health_check_service
        )

    def is_tls(self, address: ListenAddress) -> bool:
        return address.tls if address.tls is not None else bool(self.tls_cert)


# ---------------------------------------------------------------------------- converters
# Each takes the text of one value and returns it converted, or raises ValueError with what
# was expected; the caller adds which setting and which source.


def hostport(value: str) -> HostPort:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def listen_address(value: str) -> ListenAddress:
    """`HOST:PORT`, `tls:HOST:PORT`, `h2c:HOST:PORT` or `unix:PATH`."""
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):  # unix:///run/x.sock, as gRPC clients spell it
            path = path[2:]
        if not path.startswith("/") and not path.startswith("."):
            raise ValueError(f"expected unix:/ABSOLUTE/PATH, got {value!r}")
        return ListenAddress(path=path, tls=False)
    tls: bool | None = None
    for scheme, flag in (("tls:", True), ("h2c:", False)):
        if text.startswith(scheme):
            text, tls = text[len(scheme) :], flag
    try:
        host, port = hostport(text)
    except ValueError:
        raise ValueError(
            f"expected HOST:PORT, tls:HOST:PORT, h2c:HOST:PORT or unix:PATH, got {value!r}"
        ) from None
    return ListenAddress(host, port, tls=tls)


def address(value: str) -> str:
    host, port = hostport(value)
    if port == 0:
        raise ValueError(f"backend port must not be 0: {value!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def admin_address(value: str) -> HostPort | None:
    if value.strip().lower() == "off":
        return None
    try:
        return hostport(value)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or 'off', got {value!r}") from None


def route(value: str) -> Route:
    service, sep, target = value.partition("=")
    if not sep or not service.strip() or not target.strip():
        raise ValueError(f"expected SERVICE=TARGET, got {value!r}")
    return service.strip(), target.strip()


def _int(value: str, low: int) -> int:
    text = value.strip()
    if not (text.isdigit() or (text[:1] == "-" and text[1:].isdigit())) or int(text) < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"expected {what}, got {value!r}")
    return int(text)


def positive_int(value: str) -> int:
    return _int(value, 1)


def non_negative_int(value: str) -> int:
    return _int(value, 0)


def _float(value: str, what: str, ok: Callable[[float], bool]) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not ok(number):
        raise ValueError(f"expected {what}, got {value!r}")
    return number


def positive_seconds(value: str) -> float:
    return _float(value, "a number of seconds > 0", lambda x: x > 0)


def non_negative_seconds(value: str) -> float:
    return _float(value, "a number of seconds >= 0", lambda x: x >= 0)


def percent(value: str) -> float:
    return _float(value, "a percentage from 0 to 100", lambda x: 0 <= x <= 100)


def fraction(value: str) -> float:
    return _float(value, "a number from 0 to 1", lambda x: 0 <= x <= 1)


def bounded_load(value: str) -> float | None:
    # The Balancer checks the range (> 1) and that a sticky header goes with it.
    if not value.strip():
        return None
    return _float(value, "a number greater than 1 (e.g. 1.25)", lambda _: True)


def boolean(value: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def origin(value: str) -> str:
    """A browser origin as pages send it (`scheme://host[:port]`), or `*` for any."""
    text = value.strip().rstrip("/")
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(f"expected an origin such as https://app.example.com or *, got {value!r}")
    return text


def header_name(value: str) -> str:
    """An HTTP field name (lower-cased: HTTP/2 requires it)."""
    text = value.strip().lower()
    if not text or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in text):
        raise ValueError(f"expected a header name, got {value!r}")
    return text


def optional(value: str) -> str | None:
    """Free text; empty means unset."""
    return value.strip() or None


def text(value: str) -> str:
    return value.strip()


def _no_text(value: str) -> Any:
    raise ValueError("only a TOML table sets this")


def one_of(*choices: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value.strip() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value.strip()

    return convert


def optional_one_of(*choices: str) -> Callable[[str], str | None]:
    convert = one_of(*choices)
    return lambda value: convert(value) if value.strip() else None


# ---------------------------------------------------------------------------- the table

Kind = Literal["scalar", "number", "bool", "list", "routes", "allow", "endpoints", "targets"]


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting. `kind` says how the TOML file and the environment spell it: scalar (a
    TOML string), number (a TOML number), bool, list (a TOML array; comma-separated in the
    environment), routes (a TOML table or array of SERVICE=TARGET), endpoints (a TOML string
    or array; comma-separated everywhere)."""

    name: str
    convert: Callable[[str], Any]
    help: str
    metavar: str | None = None
    kind: Kind = "scalar"
    group: str = "serve"
    # Applied by SIGHUP; the others need a restart.
    reloadable: bool = False
    in_file: bool = True  # False: only a flag or a variable may set it
    in_flags: bool = True  # False: only the TOML file may set it (no flag, no variable)
    shown_default: str | None = None  # for --help, when the raw default reads badly

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.name]


def _s(name: str, convert: Callable[[str], Any], help: str, **kw: Any) -> Setting:
    return Setting(name, convert, help, **kw)


SETTINGS: tuple[Setting, ...] = (
    _s("config", optional, "read settings from this TOML file", metavar="FILE", in_file=False),
    _s(
        "listen",
        listen_address,
        "listen on HOST:PORT (':PORT' is every IPv4 interface; TLS when --tls-cert is given), "
        "tls:HOST:PORT, h2c:HOST:PORT (cleartext whatever --tls-cert says) or unix:PATH (a "
        "Unix socket, cleartext); repeatable",
        metavar="[tls:|h2c:]HOST:PORT|unix:PATH",
        kind="list",
        shown_default="127.0.0.1:50051",
    ),
    _s(
        "backend",
        address,
        "a static backend (repeatable)",
        metavar="HOST:PORT",
        kind="list",
        reloadable=True,
    ),
    _s(
        "etcd",
        optional,
        "etcd endpoints (host:port or http(s)://host:port), or 'embedded' to run a local etcd "
        "on 127.0.0.1:2379 with its data under the user's cache",
        metavar="URL[,URL...]",
        kind="endpoints",
        group="etcd",
    ),
    _s(
        "target",
        optional,
        "the default pool: every key under NAME/ in etcd (what etcd:///NAME means to Go)",
        metavar="NAME",
        reloadable=True,
    ),
    _s(
        "route",
        route,
        "send calls of this gRPC service (pkg.Service) to this target's pool (repeatable)",
        metavar="SERVICE=TARGET",
        kind="routes",
        reloadable=True,
    ),
    _s("etcd_ca", optional, "CA certificate to verify etcd", metavar="FILE", group="etcd"),
    _s("etcd_cert", optional, "client certificate for etcd", metavar="FILE", group="etcd"),
    _s("etcd_key", optional, "client key for etcd", metavar="FILE", group="etcd"),
    _s("etcd_user", optional, "etcd username", metavar="NAME", group="etcd"),
    _s(
        "etcd_password",
        optional,
        "etcd password (better in the environment than on the command line)",
        metavar="PASSWORD",
        group="etcd",
    ),
    _s(
        "policy",
        one_of(*POLICIES),
        "per-call policy; weights come from `weight` in metadata",
        metavar="{" + ",".join(POLICIES) + "}",
        group="balancing",
        reloadable=True,
    ),
    _s(
        "sticky_header",
        optional,
        "consistent hashing on this request header: one key, one backend, in every replica",
        metavar="NAME",
        group="balancing",
        reloadable=True,
    ),
    _s(
        "bounded_load",
        bounded_load,
        "with --sticky-header: a key whose backend has more than FACTOR x the average calls in "
        "flight goes to the next one on the ring (off when unset; e.g. 1.25)",
        metavar="FACTOR",
        kind="number",
        group="balancing",
        reloadable=True,
    ),
    _s(
        "pin_header",
        optional,
        "this header names one instance (metadata id, last key segment or address); the call "
        "goes there or fails with UNAVAILABLE",
        metavar="NAME",
        group="balancing",
        reloadable=True,
    ),
    _s(
        "route_allow",
        route,
        "only clients whose verified certificate names IDENTITY (a URI or DNS SAN, or the "
        "subject CN) may call SERVICE; others get PERMISSION_DENIED (repeatable; a service "
        "with no entry is open to all)",
        metavar="SERVICE=IDENTITY",
        kind="allow",
        reloadable=True,
    ),
    _s(
        "tls_cert",
        optional,
        "listener certificate (PEM; may hold the chain after the leaf)",
        metavar="FILE",
        group="tls",
        reloadable=True,
    ),
    _s(
        "tls_key",
        optional,
        "listener private key (PEM)",
        metavar="FILE",
        group="tls",
        reloadable=True,
    ),
    _s(
        "tls_client_ca",
        optional,
        "require client certificates signed by this CA (mutual TLS)",
        metavar="FILE",
        group="tls",
        reloadable=True,
    ),
    _s(
        "tls_handshake_timeout",
        positive_seconds,
        "a TLS handshake not done within this closes the connection",
        metavar="S",
        kind="number",
        group="tls",
    ),
    _s(
        "tls_max_pending_handshakes",
        positive_int,
        "TLS handshakes in progress at once; connections past it are closed on accept",
        metavar="N",
        kind="number",
        group="tls",
    ),
    _s(
        "backend_tls",
        boolean,
        "connect to backends with TLS (ALPN h2)",
        kind="bool",
        group="tls",
        reloadable=True,
    ),
    _s(
        "backend_ca",
        optional,
        "CA that signs the backends' certificates",
        metavar="FILE",
        group="tls",
        reloadable=True,
        shown_default="the system store",
    ),
    _s(
        "backend_cert",
        optional,
        "client certificate for backends that require one (mutual TLS)",
        metavar="FILE",
        group="tls",
        reloadable=True,
    ),
    _s(
        "backend_key",
        optional,
        "private key of --backend-cert",
        metavar="FILE",
        group="tls",
        reloadable=True,
    ),
    _s(
        "backend_server_name",
        optional,
        "name checked in the backends' certificates and sent as SNI",
        metavar="NAME",
        group="tls",
        reloadable=True,
        shown_default="the host of each endpoint's address",
    ),
    _s(
        "backend_tls_skip_verify",
        boolean,
        "do not verify the backends' certificates (logs a warning at start; for tests only)",
        kind="bool",
        group="tls",
        reloadable=True,
    ),
    _s(
        "targets",
        _no_text,
        "per-target backend TLS: a TOML table [targets.NAME] with any of backend_tls, "
        "backend_ca, backend_cert, backend_key, backend_server_name, backend_tls_skip_verify "
        "(what it leaves out comes from the settings above)",
        kind="targets",
        in_flags=False,
        reloadable=True,
    ),
    _s(
        "max_concurrent_streams",
        positive_int,
        "streams per client connection",
        metavar="N",
        kind="number",
        group="limits",
    ),
    _s(
        "max_header_list_size",
        positive_int,
        "decoded header list limit",
        metavar="BYTES",
        kind="number",
        group="limits",
    ),
    _s(
        "stream_window",
        positive_int,
        "per-stream flow-control window, the most buffered per stream and direction",
        metavar="BYTES",
        kind="number",
        group="limits",
    ),
    _s(
        "buffer_budget",
        positive_int,
        "response bytes the whole process may hold for clients that do not read (queued, "
        "plus backend windows granted); past 90 % new streams get REFUSED_STREAM, past all of "
        "it the connections holding the most get GOAWAY(ENHANCE_YOUR_CALM)",
        metavar="BYTES",
        kind="number",
        group="limits",
    ),
    _s(
        "connection_buffer",
        positive_int,
        "what one client connection may hold of the buffer budget: past it, its calls' "
        "backend streams get no window beyond --base-stream-window",
        metavar="BYTES",
        kind="number",
        group="limits",
    ),
    _s(
        "base_stream_window",
        positive_int,
        "the window every backend stream starts with; a call grows it to --stream-window "
        "while its connection and the process are under their buffer limits",
        metavar="BYTES",
        kind="number",
        group="limits",
    ),
    _s(
        "stalled_stream_timeout",
        positive_seconds,
        "a stream whose client gives no window while the proxy holds data for it is reset "
        "after this long, and its backend stream cancelled",
        metavar="SECONDS",
        kind="number",
        group="limits",
    ),
    _s(
        "max_connections",
        non_negative_int,
        "client connections at once per process (0: the open-files limit less a reserve); at "
        "the cap the connection idle the longest is closed (GOAWAY) so a new one is served, "
        "and only with none idle is the new one refused",
        metavar="N",
        kind="number",
        group="limits",
    ),
    _s(
        "preface_timeout",
        positive_seconds,
        "a client connection that has not sent the HTTP/2 preface and its SETTINGS this long "
        "after it was accepted (after the TLS handshake, on TLS listeners) is closed",
        metavar="SECONDS",
        kind="number",
        group="limits",
    ),
    _s(
        "idle_timeout",
        positive_seconds,
        "a client connection without a call for this long is closed (GOAWAY)",
        metavar="SECONDS",
        kind="number",
        group="limits",
    ),
    _s(
        "grpc_web",
        boolean,
        "serve gRPC-Web (application/grpc-web, +proto, -text) over HTTP/1.1 and HTTP/2 on the "
        "listeners, translated to native gRPC for the backends; off: HTTP/1 requests get 505 "
        "as before",
        kind="bool",
        group="grpc_web",
    ),
    _s(
        "cors_allowed_origins",
        origin,
        "browser origins whose pages may call through the proxy (CORS), e.g. "
        "https://app.example.com, or * for any; repeatable",
        metavar="ORIGIN",
        kind="list",
        group="grpc_web",
    ),
    _s(
        "cors_allow_headers",
        header_name,
        "request headers pages may send beyond those gRPC-Web clients always send "
        "(content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization, ...): custom "
        "metadata such as a pin or sticky header; repeatable",
        metavar="NAME",
        kind="list",
        group="grpc_web",
    ),
    _s(
        "cors_expose_headers",
        header_name,
        "response headers pages may read beyond grpc-status, grpc-message and "
        "grpc-status-details-bin: custom response metadata; repeatable",
        metavar="NAME",
        kind="list",
        group="grpc_web",
    ),
    _s(
        "http1_max_header_size",
        positive_int,
        "an HTTP/1.1 request's line and headers together; larger gets 431 and the connection "
        "closes",
        metavar="BYTES",
        kind="number",
        group="grpc_web",
    ),
    _s(
        "http1_max_request_line",
        positive_int,
        "an HTTP/1.1 request line (method, path, version); longer gets 414 and the connection "
        "closes",
        metavar="BYTES",
        kind="number",
        group="grpc_web",
    ),
    _s(
        "http1_max_body_size",
        positive_int,
        "an HTTP/1.1 request body (413 if its content-length says more; a call past it fails "
        "with RESOURCE_EXHAUSTED and the connection closes)",
        metavar="BYTES",
        kind="number",
        group="grpc_web",
    ),
    _s(
        "max_retries",
        non_negative_int,
        "other backends a call that reached no backend code may try",
        metavar="N",
        kind="number",
        group="resilience",
    ),
    _s(
        "retry_budget_percent",
        percent,
        "retries in flight may be at most this share of the calls in flight",
        metavar="PERCENT",
        kind="number",
        group="resilience",
    ),
    _s(
        "retry_budget_min",
        non_negative_int,
        "retries in flight always allowed, whatever the share",
        metavar="N",
        kind="number",
        group="resilience",
    ),
    _s(
        "outlier_consecutive_failures",
        non_negative_int,
        "failures in a row that eject a backend (0: no ejection)",
        metavar="N",
        kind="number",
        group="resilience",
    ),
    _s(
        "outlier_base_ejection",
        positive_seconds,
        "first ejection time; each further ejection lasts this x times ejected",
        metavar="S",
        kind="number",
        group="resilience",
    ),
    _s(
        "outlier_max_ejection",
        positive_seconds,
        "longest ejection",
        metavar="S",
        kind="number",
        group="resilience",
    ),
    _s(
        "outlier_max_ejection_percent",
        percent,
        "most of a pool ejected at once (one backend always may be)",
        metavar="PERCENT",
        kind="number",
        group="resilience",
    ),
    _s(
        "health_check",
        boolean,
        "check every backend with grpc.health.v1.Health/Check",
        kind="bool",
        group="resilience",
    ),
    _s(
        "health_check_interval",
        positive_seconds,
        "time between two checks of a backend",
        metavar="S",
        kind="number",
        group="resilience",
    ),
    _s(
        "health_check_timeout",
        positive_seconds,
        "a check not answered within this counts as failed",
        metavar="S",
        kind="number",
        group="resilience",
    ),
    _s(
        "health_check_service",
        text,
        "service name asked about ('' is the server's overall health)",
        metavar="NAME",
        group="resilience",
        shown_default="''",
    ),
    _s(
        "drain_timeout",
        non_negative_seconds,
        "on SIGTERM/SIGINT, how long calls in flight may take to finish",
        metavar="S",
        kind="number",
        group="operations",
    ),
    _s(
        "admin",
        admin_address,
        "admin HTTP endpoint (/metrics, /healthz, /readyz, /pool, /), or 'off'",
        metavar="HOST:PORT|off",
        group="operations",
        shown_default="127.0.0.1:9901",
    ),
    _s(
        "workers",
        positive_int,
        "processes sharing the listen port (SO_REUSEPORT)",
        metavar="N",
        kind="number",
        group="operations",
    ),
    _s(
        "log_format",
        optional_one_of(*LOG_FORMATS),
        "log line format",
        metavar="{json,console}",
        group="operations",
        shown_default="console when stderr is a terminal, else json",
    ),
    _s(
        "log_level",
        one_of(*LOG_LEVELS),
        "least severe level logged",
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        group="operations",
    ),
    _s(
        "access_log_sample",
        fraction,
        "share of calls that get an access log line (0: none)",
        metavar="FRACTION",
        kind="number",
        group="operations",
        reloadable=True,
    ),
)

_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(ServeConfig) if f.name != "sources"
}
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
if set(BY_NAME) != set(_DEFAULTS):  # pragma: no cover - a programming error, caught by tests
    raise AssertionError(f"settings and ServeConfig differ: {set(BY_NAME) ^ set(_DEFAULTS)}")

RELOADABLE = frozenset(s.name for s in SETTINGS if s.reloadable)


# ---------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """A bad setting; `str()` names the source and the setting, e.g.
    `config file proxy.toml: policy: expected one of ...`."""


# ---------------------------------------------------------------------------- flags

_GROUP_TITLES = {
    "etcd": "etcd",
    "balancing": "balancing",
    "tls": "TLS (listener and backends; SIGHUP re-reads every file)",
    "limits": "client connection limits",
    "grpc_web": "gRPC-Web (HTTP/1.1 and HTTP/2, CORS)",
    "resilience": "retries, outlier detection and health checks",
    "operations": "operations (admin endpoint, logs, drain, workers)",
}


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, every one defaulting to None so that `flag_values` can tell
    which were given. Values stay text here: `load` converts them like the other sources."""
    groups: dict[str, Any] = {"serve": parser}
    for setting in SETTINGS:
        if not setting.in_flags:
            continue
        group = groups.get(setting.group)
        if group is None:
            group = groups[setting.group] = parser.add_argument_group(_GROUP_TITLES[setting.group])
        reload = "; SIGHUP reloads it" if setting.reloadable else ""
        help_text = f"{setting.help} (default {_shown_default(setting)}; env {setting.env}{reload})"
        if setting.kind == "bool":
            group.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text.replace("%", "%%"),
            )
            continue
        repeat = setting.kind in ("list", "routes", "allow")
        group.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            action="append" if repeat else "store",
            metavar=setting.metavar,
            help=help_text.replace("%", "%%"),
        )


def _shown_default(setting: Setting) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    default = setting.default
    if default is None or default == ():
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (text, a list of text, or a bool)."""
    return {
        s.name: getattr(args, s.name)
        for s in SETTINGS
        if s.in_flags and getattr(args, s.name) is not None
    }


# ---------------------------------------------------------------------------- loading


@dataclass(slots=True)
class _Layer:
    """Values of one source, converted, with a description of where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)


def load(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    *,
    check: Callable[[ServeConfig], None] | None = None,
) -> ServeConfig:
    """Defaults < TOML file < environment < flags, converted and checked.

    `flags` is `flag_values(args)`. `check` runs the checks that need the whole config (the
    CLI's: etcd flags, the balancer); it raises ConfigError. Raises ConfigError naming the
    setting and its source."""
    env = dict(os.environ if environ is None else environ)
    from_flags = _from_flags(flags)
    from_env = _from_env(env)
    path = from_flags.values.get("config", from_env.values.get("config"))
    from_file = _from_file(path) if path else _Layer()
    values: dict[str, Any] = dict(_DEFAULTS)
    sources: dict[str, str] = {}
    for layer in (from_file, from_env, from_flags):
        values.update(layer.values)
        sources.update(layer.where)
    config = ServeConfig(**values, sources=sources)
    _check_ranges(config)
    if check is not None:
        check(config)
    return config


def describe(config: ServeConfig, name: str) -> str:
    """Where a setting came from, as a user would look for it: `--policy`,
    `GRPC_ETCD_PROXY_POLICY`, `policy (config file proxy.toml)`; the flag when defaulted."""
    return config.sources.get(name, BY_NAME[name].flag)


def _from_flags(flags: Mapping[str, Any]) -> _Layer:
    layer = _Layer()
    for name, raw in flags.items():
        setting = BY_NAME[name]
        source = setting.flag
        if setting.kind == "bool":
            value: Any = bool(raw)
        elif setting.kind in ("list", "routes", "allow"):
            value = tuple(_convert(setting, item, source) for item in raw)
        else:
            value = _convert(setting, raw, source)
        layer.values[name] = value
        layer.where[name] = source
    return layer


# Variables with the prefix that are not settings: read before any setting, by the package
# itself (proxy/__init__.py: which build of the data path to import).
NOT_SETTINGS: Final = frozenset({"GRPC_ETCD_PROXY_PURE"})


def _from_env(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in NOT_SETTINGS:
            continue
        source = f"environment {var}"
        setting = BY_NAME.get(var[len(ENV_PREFIX) :].lower())
        if setting is None or setting.env != var or not setting.in_flags:
            raise ConfigError(f"{source}: unknown setting{_suggest(var, _env_names())}")
        raw = environ[var]
        if setting.kind in ("list", "routes", "allow"):
            items = [item for item in raw.split(",") if item.strip()]
            value: Any = tuple(_convert(setting, item, source) for item in items)
        else:
            value = _convert(setting, raw, source)
        layer.values[setting.name] = value
        layer.where[setting.name] = var
    return layer


def _env_names() -> list[str]:
    return [s.env for s in SETTINGS if s.in_flags]


def _from_file(path: str) -> _Layer:
    label = f"config file {path}"
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    layer = _Layer()
    file_keys = [s.name for s in SETTINGS if s.in_file]
    for key, raw in document.items():
        setting = BY_NAME.get(key)
        if setting is None or not setting.in_file:
            hint = _suggest(key, file_keys)
            if setting is not None:
                hint = " here (give it as a flag or in the environment)"
            raise ConfigError(f"{label}: {key}: unknown setting{hint}")
        source = f"{label}: {key}"
        layer.values[key] = _from_toml(setting, raw, source)
        layer.where[key] = f"{key} ({label})"
    return layer


def _from_toml(setting: Setting, raw: Any, source: str) -> Any:
    kind = setting.kind
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: expected true or false, got {_toml_repr(raw)}")
        return raw
    if kind == "number":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{source}: expected a number, got {_toml_repr(raw)}")
        return _convert(setting, str(raw), source)
    if kind == "list":
        if isinstance(raw, str) and setting.name == "listen":
            raw = [raw]  # one listener, as the key was spelled before it took several
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: expected an array of strings, got {_toml_repr(raw)}")
        return tuple(_convert(setting, _toml_str(item, source), source) for item in raw)
    if kind in ("routes", "allow"):
        # A table {service = value} or an array of "SERVICE=VALUE"; route_allow's table
        # values may also be arrays (several identities for one service).
        many = kind == "allow"
        if isinstance(raw, dict):
            items = [
                f"{service}={_toml_str(value, source)}"
                for service, values in raw.items()
                for value in (values if many and isinstance(values, list) else [values])
            ]
        elif isinstance(raw, list):
            items = [_toml_str(item, source) for item in raw]
        else:
            table, pair = (
                ('["identity", ...]', "SERVICE=IDENTITY")
                if many
                else ('"target"', "SERVICE=TARGET")
            )
            raise ConfigError(
                f'{source}: expected a table {{"pkg.Service" = {table}}} or an array of '
                f'"{pair}", got {_toml_repr(raw)}'
            )
        return tuple(_convert(setting, item, source) for item in items)
    if kind == "targets":
        return _targets_from_toml(raw, source)
    if kind == "endpoints" and isinstance(raw, list):
        return _convert(setting, ",".join(_toml_str(item, source) for item in raw), source)
    return _convert(setting, _toml_str(raw, source), source)


def _targets_from_toml(raw: Any, source: str) -> tuple[tuple[str, BackendTLS], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected tables [targets.NAME], got {_toml_repr(raw)}")
    targets = []
    for name, table in raw.items():
        where = f"{source}.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {_toml_repr(table)}")
        fields: dict[str, Any] = {}
        for key, value in table.items():
            field_name = TARGET_KEYS.get(key)
            if field_name is None:
                hint = _suggest(key, list(TARGET_KEYS))
                raise ConfigError(f"{where}: {key}: unknown setting{hint}")
            fields[field_name] = _from_toml(BY_NAME[key], value, f"{where}.{key}")
        targets.append((name, BackendTLS(**fields)))
    return tuple(targets)


def _toml_str(raw: Any, source: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"{source}: expected a string, got {_toml_repr(raw)}")
    return raw


def _toml_repr(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        return "an array"
    return repr(raw)


def _convert(setting: Setting, raw: str, source: str) -> Any:
    try:
        return setting.convert(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_ranges(config: ServeConfig) -> None:
    """Checks between settings that need no other module."""
    _check_tls(config)
    if config.outlier_max_ejection < config.outlier_base_ejection:
        raise ConfigError(
            f"{describe(config, 'outlier_max_ejection')}: must be at least "
            f"{describe(config, 'outlier_base_ejection')} ({config.outlier_base_ejection} s), "
            f"got {config.outlier_max_ejection}"
        )


def _check_tls(config: ServeConfig) -> None:
    def name(setting: str) -> str:
        return describe(config, setting)

    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError(f"{name('tls_cert')} and {name('tls_key')} go together")
    tls_listeners = [str(a) for a in config.listen if config.is_tls(a)]
    if tls_listeners and not config.tls_cert:
        raise ConfigError(
            f"{name('listen')}: {tls_listeners[0]} is a TLS listener: it needs "
            f"{name('tls_cert')} FILE and {name('tls_key')} FILE"
        )
    if config.tls_client_ca and not tls_listeners:
        raise ConfigError(f"{name('tls_client_ca')}: no TLS listener to require client certs on")
    if bool(config.backend_cert) != bool(config.backend_key):
        raise ConfigError(f"{name('backend_cert')} and {name('backend_key')} go together")
    if not config.backend_tls and not config.targets:
        for setting in (
            "backend_ca",
            "backend_cert",
            "backend_server_name",
            "backend_tls_skip_verify",
        ):
            if getattr(config, setting):
                raise ConfigError(f"{name(setting)} needs {name('backend_tls')}")
    if config.route_allow and not config.tls_client_ca:
        raise ConfigError(
            f"{name('route_allow')}: client identities come from client certificates: it "
            f"needs {name('tls_client_ca')} on a TLS listener"
        )
    paths = [a.path for a in config.listen if a.path is not None]
    if config.workers > 1 and paths:
        raise ConfigError(
            f"{name('listen')}: unix:{paths[0]}: a Unix socket listener needs "
            f"{name('workers')} 1 (workers share TCP ports with SO_REUSEPORT, which Unix "
            "sockets do not have)"
        )


def replace(config: ServeConfig, **changes: Any) -> ServeConfig:
    return dataclasses.replace(config, **changes)


def changed(old: ServeConfig, new: ServeConfig) -> list[str]:
    """Names of the settings whose values differ."""
    return [s.name for s in SETTINGS if getattr(old, s.name) != getattr(new, s.name)]
