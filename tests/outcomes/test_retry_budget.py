"""RetryBudget as pure logic: max(min, percent % of calls in flight) retries at once."""

from __future__ import annotations

import pytest

from proxy.core.retry_budget import RetryBudget


def grant(budget: RetryBudget, asked: int, calls: int) -> int:
    return sum(budget.acquire(calls) for _ in range(asked))


def test_the_minimum_holds_when_few_calls_are_in_flight() -> None:
    budget = RetryBudget(percent=20.0, min_concurrency=3)
    assert grant(budget, 10, calls=5) == 3  # 20 % of 5 is 1
    assert budget.retries == 3


def test_the_share_holds_when_many_calls_are_in_flight() -> None:
    budget = RetryBudget(percent=20.0, min_concurrency=3)
    assert grant(budget, 50, calls=100) == 20
    assert grant(budget, 5, calls=101) == 1  # 20.2 allowed: one more


def test_released_slots_are_granted_again() -> None:
    budget = RetryBudget(percent=0.0, min_concurrency=2)
    assert grant(budget, 3, calls=50) == 2
    budget.release()
    assert budget.acquire(50) is True
    assert budget.acquire(50) is False


def test_zero_budget_allows_no_retry() -> None:
    budget = RetryBudget(percent=0.0, min_concurrency=0)
    assert grant(budget, 3, calls=1000) == 0


@pytest.mark.parametrize(("percent", "minimum"), [(-1.0, 3), (100.5, 3), (20.0, -1)])
def test_bad_settings_are_refused(percent: float, minimum: int) -> None:
    with pytest.raises(ValueError):
        RetryBudget(percent, minimum)
