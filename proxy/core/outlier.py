"""Passive outlier detection: backends that keep failing calls are taken out of rotation.

Envoy's consecutive-failures scheme (envoy.config.cluster.v3.OutlierDetection):

- A backend that fails `consecutive_failures` times in a row (connect errors and timeouts,
  handshake timeouts, resets and lost connections, responses with grpc-status UNAVAILABLE) is
  ejected; any success in between starts the count again.
- The n-th ejection lasts `base_ejection_s` x n, capped at `max_ejection_s`. The multiplier
  decays by one for each `base_ejection_s` the backend then stays in, so a backend that failed
  once last week is not punished as a repeat offender today (Envoy decays it each interval).
- No more than `max_ejection_percent` of a pool is ejected at once, but one backend always may
  be, whatever the percentage (Envoy's behaviour: in a pool of three, 10 % would otherwise
  never eject anything).
- An ejected backend comes back on its own when its time is up. Nothing runs on a timer: the
  check is made when somebody asks (`usable`, `ejected_until`), and the return is logged then.

Ejection is by address, shared by every pool that holds it; a pool's share is counted over its
own addresses. The detector keeps no asyncio state: the caller passes the pools, and the clock
(the event loop's) is given at construction, so tests drive it by hand.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable

import structlog

log = structlog.get_logger("proxy.outlier")


class OutlierDetector:
    """Consecutive-failure ejection per backend address (0 consecutive failures: off).

    `failures[address]`: failures in a row so far (absent: none); `ejected[address]`: until
    when (clock time) it is out, possibly already past and not yet noticed;
    `ejections_total[address]`: every ejection since start.
    """

    def __init__(
        self,
        consecutive_failures: int = 5,
        base_ejection_s: float = 30.0,
        max_ejection_s: float = 300.0,
        max_ejection_percent: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures < 0:
            raise ValueError(f"consecutive_failures must be >= 0, got {consecutive_failures}")
        if not base_ejection_s > 0 or not math.isfinite(base_ejection_s):
            raise ValueError(f"base_ejection_s must be > 0, got {base_ejection_s}")
        if not max_ejection_s > 0 or not math.isfinite(max_ejection_s):
            raise ValueError(f"max_ejection_s must be > 0, got {max_ejection_s}")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(
                f"max_ejection_percent must be within 0..100, got {max_ejection_percent}"
            )
        self.consecutive_failures = consecutive_failures
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejection_percent = max_ejection_percent
        self.clock = clock
        self.failures: dict[str, int] = {}
        self.ejected: dict[str, float] = {}
        self.ejections_total: Counter[str] = Counter()
        # address -> (ejection multiplier, end of its last ejection): what the next one costs.
        self._record: dict[str, tuple[int, float]] = {}
        # Backends whose ejection the pool share held back; logged once per streak.
        self._held_back: set[str] = set()

    # ------------------------------------------------------------------ outcomes

    def succeeded(self, address: str) -> None:
        """A call the backend answered with a status other than UNAVAILABLE."""
        self.failures.pop(address, None)
        self._held_back.discard(address)

    def failed(self, address: str, pools: Iterable[Collection[str]]) -> bool:
        """Count a failure of `address`, a member of each of `pools` (their addresses).
        True when this failure ejected it."""
        threshold = self.consecutive_failures
        if not threshold:
            return False
        now = self.clock()
        if not self.usable(address, now):
            return False  # already out: late failures of calls it still had are no news
        count = self.failures.get(address, 0) + 1
        if count < threshold:
            self.failures[address] = count
            return False
        # As Envoy: the count starts again whether or not the share allows the ejection.
        del self.failures[address]
        for pool in pools:
            if not self._has_room(pool, now):
                if address not in self._held_back:
                    self._held_back.add(address)
                    log.warning(
                        "backend_ejection_held_back",
                        backend=address,
                        reason=f"max_ejection_percent ({self.max_ejection_percent:g} %) of its "
                        "pool already ejected",
                    )
                return False
        self._held_back.discard(address)
        times = self.times_ejected(address, now) + 1
        duration = min(self.base_ejection_s * times, self.max_ejection_s)
        until = now + duration
        self.ejected[address] = until
        self._record[address] = (times, until)
        self.ejections_total[address] += 1
        log.warning("backend_ejected", backend=address, times=times, for_s=round(duration, 3))
        return True

    def _has_room(self, pool: Collection[str], now: float) -> bool:
        out = sum(1 for a, until in self.ejected.items() if until > now and a in pool)
        return not out or (out + 1) * 100 <= self.max_ejection_percent * len(pool)

    # ------------------------------------------------------------------ state

    def usable(self, address: str, now: float) -> bool:
        """False while ejected; the first question after its time is up brings it back."""
        until = self.ejected.get(address)
        if until is None:
            return True
        if now < until:
            return False
        del self.ejected[address]
        log.info("backend_returned", backend=address)
        return True

    def ejected_until(self, address: str) -> float | None:
        """Clock time when the ejection of `address` ends, or None when it is not ejected."""
        if self.usable(address, self.clock()):
            return None
        return self.ejected[address]

    def times_ejected(self, address: str, now: float | None = None) -> int:
        """The ejection multiplier: ejections so far, less one for each base ejection time
        the backend has stayed in since its last one."""
        record = self._record.get(address)
        if record is None:
            return 0
        times, until = record
        if now is None:
            now = self.clock()
        if now < until:
            return times
        return max(0, times - int((now - until) // self.base_ejection_s))

    def retain(self, addresses: Collection[str]) -> None:
        """Forget backends no longer in any pool (one that comes back starts afresh)."""
        for table in (self.failures, self.ejected, self._record):
            for address in [a for a in table if a not in addresses]:
                del table[address]
        self._held_back &= set(addresses)
