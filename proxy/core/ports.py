"""The ports: what the sans-I/O core needs from the runtime around it, as Protocols.

The core (a `Call`, the balancer, outlier detection) never imports asyncio or the adapters; it
talks to these. The runtime's classes satisfy them (`Downstream` is a `ClientSide`,
`BackendConnection` a `BackendSide`, `EndpointConnections` a `ConnectionOwner`, the dispatcher a
`CallRouter`), and unit tests drive the core through small fakes of them
(tests/core/fakes.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from proxy.core.grpc_status import Status

if TYPE_CHECKING:
    from proxy.core.buffers import ConnectionBuffer
    from proxy.core.call import Call
    from proxy.core.endpoints import Endpoint
    from proxy.core.h2.connection import Connection
    from proxy.core.h2.events import HeaderList
    from proxy.core.identity import Identity


class ClientStreams(Protocol):
    """What a call does on its client's side: the methods of the server-role codec
    (`proxy.core.h2.connection.Connection`) that it uses. A gRPC-Web call gets a translator
    with the same methods instead (proxy/core/web_call.py). `Call` calls the codec directly
    when it is one (`Call.conn`: compiled, a native call), and this protocol otherwise."""

    @property
    def queued(self) -> int:
        """Response bytes held for the client connection, waiting for it to read."""
        ...

    def send_headers(self, sid: int, headers: HeaderList, end_stream: bool) -> None: ...

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> int:
        """Returns the bytes written at once; the rest is reported flushed later."""
        ...

    def ack_data(self, sid: int, length: int) -> None: ...

    def grant(self, sid: int, length: int) -> None: ...


class ClientSide(Protocol):
    """What a call needs of the client connection it belongs to."""

    @property
    def h2(self) -> ClientStreams: ...

    peer: str
    identity: Identity | None  # what a verified client certificate names
    buffer: ConnectionBuffer  # its share of the buffer budget: grants of backend windows

    def mark(self) -> None: ...

    def call_finished(self, stream_id: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call gets no backend, and the status that says so."""

    status: Status
    message: str
    final: bool = False  # the message stands as is, even after retries


class CallRouter(Protocol):
    """What a call needs of the proxy: where to go next, and the way to get there."""

    def pick(self, call: Call) -> Endpoint | Refusal:
        """An endpoint for this call (not one it tried), or why there is none. The first
        pick (no attempt yet) also starts the call's clock."""
        ...

    def retry(self, call: Call, kind: str) -> Refusal | None:
        """May the call be sent again (after a failure of `kind`)? None: yes, counted."""
        ...

    def backend_failed(self, address: str) -> None:
        """A failure that outlier detection counts against this backend."""
        ...

    def call_ended(self, call: Call, status: int, answered: bool) -> None:
        """The call is over with this grpc-status; `answered`: the backend gave the status.
        Releases the call's endpoint as `release` does."""
        ...

    def attach(self, endpoint: Endpoint, call: Call) -> None:
        """Send the call to this endpoint (counts it as in flight there, and as started
        there on its first attempt)."""
        ...

    def release(self, call: Call) -> None:
        """The call no longer occupies its endpoint (finished, or moving to another)."""
        ...

    @property
    def max_attempts(self) -> int: ...

    @property
    def replay_limit(self) -> int: ...


class BackendSide(Protocol):
    """What a call needs of the backend connection its stream is on."""

    h2: Connection

    def mark(self) -> None:
        """Output is queued in `h2`: write it at the end of this loop turn."""
        ...

    def cancel(self, call: Call) -> None:
        """The call is over on the client side: reset its backend stream if still open."""
        ...


# The runtime's backend connection type, as the pool sees it.
Conn_contra = TypeVar("Conn_contra", contravariant=True)


class ConnectionOwner(Protocol[Conn_contra]):
    """What a backend connection needs of the pool that opened it (per backend address)."""

    address: str

    @property
    def connect_timeout_s(self) -> float: ...

    def attach(self, call: Call) -> None:
        """Give the call a stream on some connection of this backend (or a place in line)."""
        ...

    def stream_finished(self, conn: Conn_contra) -> None: ...

    def capacity_changed(self, conn: Conn_contra) -> None: ...

    def connection_draining(self, conn: Conn_contra) -> None: ...

    def connection_closed(self, conn: Conn_contra) -> None: ...

    def backend_failed(self) -> None:
        """A connection-level failure that outlier detection counts against this backend."""
        ...


class HealthSource(Protocol):
    """What the server asks of active health checking (None on the server: checks are off)."""

    # Checks made, by (address, result).
    checks_total: Counter[tuple[str, str]]

    def usable(self, address: str) -> bool:
        """False while the last checks said the backend is out (NOT_SERVING or no answer)."""
        ...

    def status(self, address: str) -> str:
        """One of "serving", "not_serving", "unknown"."""
        ...
