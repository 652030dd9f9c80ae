"""The retry budget: retries may add only a share of the load, so a sick pool is not hammered.

Envoy's retry_budget (envoy.config.route.v3.RetryPolicy.RetryBudget): a retry is allowed while
the retries in flight are fewer than `percent` % of the calls in flight, or than
`min_concurrency`, whichever is more (the floor lets a quiet proxy still retry). When most
calls fail, as in a pool whose backends are all down, retries stop at that share instead of
multiplying the load by the number of attempts.

A call takes a slot at its first retry and keeps it until it ends, so a call on its second
retry does not ask again: its place was granted. The calls in flight are not counted here: the
server already counts them per backend, and sums them only when a call asks to retry, so a
call that needs no retry pays nothing for the budget.
"""

from __future__ import annotations

import math


class RetryBudget:
    __slots__ = ("min_concurrency", "percent", "retries")

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        if not 0 <= percent <= 100 or not math.isfinite(percent):
            raise ValueError(f"retry budget percent must be within 0..100, got {percent}")
        if min_concurrency < 0:
            raise ValueError(f"retry budget minimum must be >= 0, got {min_concurrency}")
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.retries = 0  # calls in flight holding a retry slot

    def limit(self, calls: int) -> float:
        """How many retries may be in flight with `calls` calls in flight."""
        return max(self.min_concurrency, self.percent * calls / 100)

    def acquire(self, calls: int) -> bool:
        """Take a retry slot if the budget has room, `calls` calls being in flight."""
        if self.retries < self.limit(calls):
            self.retries += 1
            return True
        return False

    def release(self) -> None:
        self.retries -= 1
