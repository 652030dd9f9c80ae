"""The runtime's options, with their defaults written once.

The config model (proxy.app.config) takes its defaults from these objects and builds them from
the settings of the same names (`ServeConfig.server_options()`); the runtime takes them as they
are. Durations are in seconds, as every setting is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.core.buffers import (
    DEFAULT_BASE_STREAM_WINDOW,
    DEFAULT_BUFFER_BUDGET,
    DEFAULT_CONNECTION_BUFFER,
)
from proxy.core.grpcweb import (
    DEFAULT_HTTP1_MAX_BODY_SIZE,
    DEFAULT_HTTP1_MAX_HEADER_SIZE,
    DEFAULT_HTTP1_MAX_REQUEST_LINE,
)
from proxy.core.units import SECONDS

# Where the proxy listens unless told: loopback only (nothing beyond it unless asked).
DEFAULT_LISTEN: Final = ("127.0.0.1", 50051)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    max_retries: int = 2  # other backends tried for a call that reached no backend code
    replay_limit: int = 256 * 1024  # request bytes kept for such a retry
    connect_timeout: float = 5 * SECONDS
    max_connections_per_backend: int = 16
    # Retries in flight <= max(min, percent % of calls in flight) (see retry_budget.py).
    retry_budget_percent: float = 20.0
    retry_budget_min: int = 3
    # Passive outlier detection (see proxy/core/outlier.py); 0 failures: off.
    outlier_consecutive_failures: int = 5
    outlier_base_ejection: float = 30 * SECONDS
    outlier_max_ejection: float = 300 * SECONDS
    outlier_max_ejection_percent: float = 10.0
    access_log_sample: float = 1.0  # share of calls logged on "proxy.access"; 0: off
    tls_handshake_timeout: float = 5 * SECONDS
    tls_max_pending_handshakes: int = 1024
    # Overload (see proxy/core/buffers.py): bytes held for clients, process-wide and per client
    # connection; the window every backend stream gets before any grant; and how long a stream
    # may hold data its client gives no window for before it is reset.
    buffer_budget: int = DEFAULT_BUFFER_BUDGET
    connection_buffer: int = DEFAULT_CONNECTION_BUFFER
    base_stream_window: int = DEFAULT_BASE_STREAM_WINDOW
    stalled_stream_timeout: float = 30 * SECONDS
    # Client connections at once (0: sized from the open-files limit), and how long one may
    # stay without a call before it is closed.
    max_connections: int = 0
    idle_timeout: float = 3600 * SECONDS
    # From accept (or the end of the TLS handshake) to the client's preface and SETTINGS.
    preface_timeout: float = 10 * SECONDS
    # gRPC-Web (proxy/core/grpcweb.py): on by default, since no browser page can use it
    # before an origin is allowed; the CORS policy; and the HTTP/1.1 limits, per request.
    grpc_web: bool = True
    cors_allowed_origins: tuple[str, ...] = ()
    cors_allow_headers: tuple[str, ...] = ()
    cors_expose_headers: tuple[str, ...] = ()
    http1_max_header_size: int = DEFAULT_HTTP1_MAX_HEADER_SIZE
    http1_max_request_line: int = DEFAULT_HTTP1_MAX_REQUEST_LINE
    http1_max_body_size: int = DEFAULT_HTTP1_MAX_BODY_SIZE


@dataclass(frozen=True, slots=True)
class HealthCheckOptions:
    """Active health checks (grpc.health.v1), when turned on."""

    interval: float = 5 * SECONDS
    timeout: float = 1 * SECONDS
    service: str = ""
