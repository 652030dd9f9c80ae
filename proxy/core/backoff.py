"""Exponential backoff with jitter: one shape for every retry loop in the proxy.

The n-th delay (n >= 1) is ``initial_s * factor**(n-1)``, capped at ``max_s``, times a random
factor in ``[1 - jitter, 1 + jitter]``: the jitter keeps a fleet of proxies from retrying a
recovering backend or etcd in lockstep. gRPC's own connection backoff has this shape (base 1 s,
x1.6, cap 120 s, jitter 0.2); the proxy starts lower because it has other backends to try.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.core.units import SECONDS


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 0.1 * SECONDS
    max_s: float = 5 * SECONDS
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, failures: int) -> float:
        """The wait after `failures` failures in a row (the first failure: `initial_s`)."""
        base = min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def delays(self) -> Iterator[float]:
        """An endless sequence of delays, to restart after each success."""
        failures = 0
        while True:
            failures += 1
            yield self.delay(failures)
