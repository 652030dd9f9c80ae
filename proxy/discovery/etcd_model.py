"""What the etcd wrapper takes and gives: its config, results and errors (no etcd library).

Kept apart from ``etcd.py`` so that configuration, the CLI and the pure parts can use these
types without loading the gRPC client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proxy.core.units import SECONDS
from proxy.discovery.values import Event

DEFAULT_ENDPOINT = "127.0.0.1:2379"


class EtcdError(Exception):
    """Talking to etcd failed."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered (refused, timed out, no leader, stream lost)."""


class WatchDisconnected(EtcdUnavailable):
    """A watch stream ended; resume from the last revision seen + 1."""


class WatchCompacted(EtcdError):
    """The revision a watch asked for is compacted away: list again, then watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


class WatchCanceled(EtcdError):
    """etcd canceled a watch for another reason than compaction (e.g. permissions)."""


class LeaseLost(EtcdError):
    """The lease is gone (expired or revoked): its keys are deleted."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id:x} expired or was revoked")
        self.lease_id = lease_id


class EtcdAuthError(EtcdError):
    """etcd refused the credentials or the permissions."""


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """How to reach etcd: endpoints (``host:port`` or ``http(s)://host:port``), TLS, auth.

    TLS is on when an endpoint is ``https://`` or any of the TLS files is given; without a
    CA file the system's roots verify the server. ``server_name`` overrides the name checked
    in the server certificate.
    """

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    server_name: str | None = None
    request_timeout_s: float = 5 * SECONDS

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("no etcd endpoint given")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if (self.username is None) != (self.password is None):
            raise ValueError("etcd auth needs both username and password")
        _ = self.addresses  # a malformed URL fails here, not at the first call

    @property
    def uses_tls(self) -> bool:
        """Whether channels are TLS (an https:// endpoint or a TLS file was given)."""
        return any(e.startswith("https://") for e in self.endpoints) or any(
            f is not None for f in (self.ca_file, self.cert_file, self.key_file)
        )

    @property
    def addresses(self) -> tuple[str, ...]:
        """The endpoints as gRPC ``host:port`` targets (scheme and path removed)."""
        return tuple(_grpc_target(e) for e in self.endpoints)


def etcd_config(etcd: EtcdConfig | str | Sequence[str], **options: Any) -> EtcdConfig:
    """An :class:`EtcdConfig` from a config, a comma-separated URL list or a list of URLs."""
    if isinstance(etcd, EtcdConfig):
        return etcd
    urls = [etcd] if isinstance(etcd, str) else list(etcd)
    endpoints = tuple(part.strip() for url in urls for part in url.split(",") if part.strip())
    return EtcdConfig(endpoints, **options)


def _grpc_target(endpoint: str) -> str:
    if "://" not in endpoint:
        return endpoint
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port or http(s)://host:port")
    return parts.netloc


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it."""

    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """What one watch response said.

    ``revision`` is the resume point: every event up to it has been delivered. For the first
    batch (``created``, no events) it is the start revision - 1.
    """

    events: tuple[Event, ...]
    revision: int
    created: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease; ``ttl_s`` is what etcd granted (it may round the request up)."""

    id: int
    ttl_s: int


def decode_key(key: bytes) -> str:
    """etcd keys are bytes; ours are text, and a stray byte must not break the pool."""
    return key.decode("utf-8", errors="backslashreplace")
