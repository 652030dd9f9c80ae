"""Calls waiting for a backend stream: for a connection being set up, or for room on a full one.

A call is in at most one queue, and only the queue writes `Call.waiting`: the pool adds and
takes, a call that ends while waiting (its client reset it) withdraws itself. A dict keeps the
order of arrival and makes that withdrawal O(1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.core.call import Call

_ABSENT: Final = object()


class WaitQueue:
    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[Call, None] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def __contains__(self, call: Call) -> bool:
        return call in self._calls

    def add(self, call: Call) -> None:
        assert call.waiting is None, "a call waits in one queue at a time"
        self._calls[call] = None
        call.waiting = self

    def pop(self) -> Call:
        """The call that has waited longest, out of the queue."""
        call = next(iter(self._calls))
        del self._calls[call]
        call.waiting = None
        return call

    def take_all(self) -> list[Call]:
        """Every call, in order of arrival, out of the queue."""
        calls = list(self._calls)
        self._calls.clear()
        for call in calls:
            call.waiting = None
        return calls

    def withdraw(self, call: Call) -> None:
        """Out of this queue, if in it (a second withdraw does nothing)."""
        if self._calls.pop(call, _ABSENT) is not _ABSENT:  # one lookup
            call.waiting = None
