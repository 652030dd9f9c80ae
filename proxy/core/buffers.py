"""What the proxy holds in memory for its clients, and the budget that bounds it.

Response bytes a client does not read wait in its codec's stream queues (`Connection.queued`),
and request bytes a backend has not taken wait in the backend codec's; both count here, and so
do the copies of requests a call keeps for a replay (`ConnectionBuffer.hold`). Each stream may
receive what its window allows: a base window (`base_stream_window`, given to every stream so
that every call makes progress; at least HTTP/2's default toward clients) plus a grant on top,
up to the full `stream_window`, which a call asks for once its message grows past half the base. A
grant is given only while the client connection, counting the grants of its open backend
streams and what its queues hold, stays under `connection_buffer`, and the process, counted the
same way over every connection, stays under `buffer_budget`. So a client that stops reading
holds at most its grants plus a base window per stream, whatever its backends send, and other
clients' calls keep their full windows (the backend connection they share is not stalled: only
the stalled streams' windows stop).

Past `shed_at` of the budget the proxy refuses new streams (REFUSED_STREAM, which clients
retry), and past the whole budget the connections holding the most bytes are sent
GOAWAY(ENHANCE_YOUR_CALM) and closed: at the end of the loop turn in which a grant was refused
or bytes were queued over the budget (`BufferMeter.on_over`), and at proxy.runtime.listener's
sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.core.units import KiB, MiB

DEFAULT_BUFFER_BUDGET: Final = 256 * MiB
DEFAULT_CONNECTION_BUFFER: Final = 16 * MiB
DEFAULT_BASE_STREAM_WINDOW: Final = 32 * KiB
# The share of the budget past which new streams are refused.
SHED_AT: Final = 0.9


class BufferMeter:
    """Bytes held and granted, process-wide (one, shared by every client connection)."""

    __slots__ = ("budget", "granted", "on_over", "queued")

    def __init__(self, budget: int = DEFAULT_BUFFER_BUDGET) -> None:
        self.budget = budget
        self.queued = 0  # bytes in codecs' stream queues (waiting for a peer's window)
        self.granted = 0  # stream windows granted beyond the base window
        # Called when a grant is refused with the process over its budget: the runtime sheds
        # then, rather than at its next periodic check.
        self.on_over: Callable[[], None] | None = None

    @property
    def used(self) -> int:
        return self.queued + self.granted

    def refusing(self) -> bool:
        """Past SHED_AT of the budget: new streams are refused."""
        return self.queued + self.granted > self.budget * SHED_AT

    def over(self) -> bool:
        return self.queued + self.granted > self.budget


class ConnectionBuffer:
    """One client connection's share: its queued bytes are its codec's `queued`; this keeps
    the grants of its calls' backend streams and decides new ones."""

    __slots__ = ("ask_after", "cap", "granted", "meter", "want")

    def __init__(
        self,
        meter: BufferMeter,
        cap: int = DEFAULT_CONNECTION_BUFFER,
        base_window: int = DEFAULT_BASE_STREAM_WINDOW,
        full_window: int = 256 * KiB,
    ) -> None:
        self.meter = meter
        self.cap = cap
        self.granted = 0
        # A call asks for `want` more once its response passes `ask_after` bytes: small
        # responses never ask, and a stream never waits for window it could have had.
        self.want = max(0, full_window - base_window)
        self.ask_after = base_window // 2

    def grant(self, want: int, queued: int) -> int:
        """Up to `want` bytes of window for one backend stream (0: none now). `queued`: what
        this connection's codec holds."""
        room = min(
            self.cap - self.granted - queued,
            self.meter.budget - self.meter.granted - self.meter.queued,
        )
        n = min(want, room)
        if n <= 0:
            meter = self.meter
            if meter.on_over is not None and meter.queued + meter.granted > meter.budget:
                meter.on_over()
            return 0
        self.granted += n
        self.meter.granted += n
        return n

    def hold(self, n: int, queued: int) -> bool:
        """Count `n` bytes the proxy keeps for this connection (a call's copy of its request,
        for a replay) if both limits have room; False: keep nothing."""
        meter = self.meter
        if self.granted + queued + n > self.cap or meter.granted + meter.queued + n > meter.budget:
            return False
        self.granted += n
        meter.granted += n
        return True

    def release(self, n: int) -> None:
        """A backend stream with a grant of `n` ended: no more bytes can come on it."""
        self.granted -= n
        self.meter.granted -= n
