"""OutlierDetector as pure logic, on a clock the test moves by hand."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core import outlier
from proxy.core.outlier import OutlierDetector

POOL = [f"10.0.0.{i}:50051" for i in range(10)]
A, B, C = POOL[:3]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Logs(list[dict[str, Any]]):
    """Stands in for the module's structlog logger (a configured one may be cached)."""

    def _record(self, event: str, **fields: Any) -> None:
        self.append({"event": event, **fields})

    info = warning = _record


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Logs:
    recorded = Logs()
    monkeypatch.setattr(outlier, "log", recorded)
    return recorded


def detector(clock: Clock, **kwargs: float) -> OutlierDetector:
    options: dict[str, float] = {
        "consecutive_failures": 3,
        "base_ejection_s": 10.0,
        "max_ejection_s": 35.0,
        "max_ejection_percent": 10.0,
    }
    options.update(kwargs)
    return OutlierDetector(
        int(options["consecutive_failures"]),
        options["base_ejection_s"],
        options["max_ejection_s"],
        options["max_ejection_percent"],
        clock=clock,
    )


def fail(det: OutlierDetector, address: str, times: int, pool: list[str] = POOL) -> list[bool]:
    return [det.failed(address, [pool]) for _ in range(times)]


def test_ejected_after_consecutive_failures_only() -> None:
    clock = Clock()
    det = detector(clock)
    assert fail(det, A, 2) == [False, False]
    assert det.usable(A, clock.now)
    assert det.ejected_until(A) is None
    assert det.failed(A, [POOL]) is True
    assert not det.usable(A, clock.now)
    assert det.ejected_until(A) == clock.now + 10.0
    assert det.times_ejected(A) == 1
    assert det.ejections_total == {A: 1}
    # Others are untouched.
    assert det.usable(B, clock.now)


def test_a_success_resets_the_count() -> None:
    clock = Clock()
    det = detector(clock)
    fail(det, A, 2)
    det.succeeded(A)
    assert fail(det, A, 2) == [False, False]
    assert det.usable(A, clock.now)
    assert det.failed(A, [POOL]) is True


def test_failures_of_other_backends_do_not_interleave() -> None:
    clock = Clock()
    det = detector(clock, max_ejection_percent=100)
    for _ in range(2):
        det.failed(A, [POOL])
        det.failed(B, [POOL])
        det.succeeded(C)
    assert det.failed(A, [POOL]) and det.failed(B, [POOL])


def test_comes_back_when_its_time_is_up_and_says_so_once(logs: Logs) -> None:
    clock = Clock()
    det = detector(clock)
    fail(det, A, 3)
    clock.now += 9.99
    assert not det.usable(A, clock.now)
    clock.now += 0.01
    assert det.usable(A, clock.now)
    assert det.usable(A, clock.now)
    assert det.ejected_until(A) is None
    events = [(e["event"], e["backend"]) for e in logs]
    assert events == [("backend_ejected", A), ("backend_returned", A)]
    assert logs[0]["times"] == 1 and logs[0]["for_s"] == 10.0


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    clock = Clock()
    det = detector(clock)  # base 10 s, max 35 s
    durations = []
    for _ in range(5):
        assert fail(det, A, 3)[-1] is True
        until = det.ejected_until(A)
        assert until is not None
        durations.append(until - clock.now)
        clock.now = until  # back, and failing again at once
        assert det.usable(A, clock.now)
    assert durations == [10.0, 20.0, 30.0, 35.0, 35.0]
    assert det.ejections_total[A] == 5


def test_the_multiplier_decays_while_the_backend_stays_in() -> None:
    clock = Clock()
    det = detector(clock)
    fail(det, A, 3)
    clock.now += 10
    fail(det, A, 3)  # second ejection: 20 s
    clock.now += 20
    assert det.times_ejected(A) == 2
    clock.now += 10  # one base ejection time in: one less
    assert det.times_ejected(A) == 1
    fail(det, A, 3)
    assert det.ejected_until(A) == clock.now + 20.0  # the 2nd rate again, not the 3rd
    clock.now += 20 + 100
    assert det.times_ejected(A) == 0


def test_failures_while_ejected_are_ignored() -> None:
    clock = Clock()
    det = detector(clock)
    fail(det, A, 3)
    until = det.ejected_until(A)
    assert fail(det, A, 10) == [False] * 10
    assert det.ejected_until(A) == until
    assert det.ejections_total[A] == 1
    clock.now = until or 0.0
    # Back with a clean count.
    assert fail(det, A, 3) == [False, False, True]


@pytest.mark.parametrize(
    ("pool_size", "percent", "allowed"),
    [
        (10, 10.0, 1),
        (10, 20.0, 2),
        (10, 25.0, 2),
        (4, 50.0, 2),
        (3, 10.0, 1),  # 10 % of 3 is not one backend; one may be ejected anyway
        (2, 0.0, 1),  # ... whatever the share
        (5, 100.0, 5),
    ],
)
def test_never_more_than_the_max_share_but_always_one(
    pool_size: int, percent: float, allowed: int
) -> None:
    clock = Clock()
    det = detector(clock, max_ejection_percent=percent)
    pool = POOL[:pool_size]
    ejected = [address for address in pool if fail(det, address, 3, pool)[-1]]
    assert len(ejected) == allowed
    assert sum(not det.usable(a, clock.now) for a in pool) == allowed


def test_share_held_back_backend_is_ejected_once_room_is_made(logs: Logs) -> None:
    clock = Clock()
    det = detector(clock, base_ejection_s=10.0)
    pool = POOL[:3]
    assert fail(det, A, 3, pool)[-1] is True
    assert fail(det, B, 3, pool)[-1] is False  # A is out: no room for B
    assert fail(det, B, 3, pool)[-1] is False
    held = [e for e in logs if e["event"] == "backend_ejection_held_back"]
    assert len(held) == 1  # logged once, not per refusal
    clock.now += 10  # A's time is up
    assert fail(det, B, 3, pool)[-1] is True
    assert det.usable(A, clock.now)


def test_share_counts_each_pool_holding_the_backend() -> None:
    clock = Clock()
    det = detector(clock, max_ejection_percent=50)
    big, small = POOL[:10], [A, B]
    fail(det, A, 3, big)
    assert not det.usable(A, clock.now)
    # B is in both: the big pool has room, the small one (A out of two) has not.
    assert det.failed(B, [big, small]) is False
    fail(det, B, 1, big)
    assert det.failed(B, [big, small]) is False
    assert det.usable(B, clock.now)
    fail(det, C, 3, big)
    assert not det.usable(C, clock.now)


def test_expired_ejections_do_not_count_against_the_share() -> None:
    clock = Clock()
    det = detector(clock)
    pool = POOL[:3]
    fail(det, A, 3, pool)
    clock.now += 11  # A's ejection is over, though nobody asked about A yet
    assert fail(det, B, 3, pool)[-1] is True


def test_zero_consecutive_failures_turns_it_off() -> None:
    clock = Clock()
    det = detector(clock, consecutive_failures=0)
    assert not any(fail(det, A, 100))
    assert det.usable(A, clock.now) and not det.ejected


def test_retain_forgets_backends_that_left_every_pool() -> None:
    clock = Clock()
    det = detector(clock)
    fail(det, A, 3)
    fail(det, B, 2)
    det.retain({C})
    assert det.usable(A, clock.now) and det.times_ejected(A) == 0
    assert det.failed(B, [POOL]) is False  # its count started again
    assert det.ejections_total[A] == 1  # the running total stays


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": -1},
        {"base_ejection_s": 0},
        {"max_ejection_s": -1},
        {"max_ejection_percent": 101},
        {"max_ejection_percent": -0.5},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        detector(Clock(), **kwargs)
