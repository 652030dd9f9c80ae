"""CPU time from /proc: how busy a process tree and a core were during one measured run.

Both figures are there to read a run right: a proxy below 100 % of its core while the load core
is at 100 % was limited by the load side (load generator and backends), not by itself.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, which may hold spaces."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in (PROC / str(pid) / "task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree(pids: Iterable[int]) -> list[int]:
    todo = list(pids)
    seen: list[int] = []
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += _children(pid)
    return seen


def process_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes and their descendants."""
    ticks = 0
    for pid in _tree(pids):
        fields = _stat_fields(pid)
        if fields is not None:
            # utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def core_ticks(cpu: int | None) -> tuple[int, int] | None:
    """(busy, total) jiffies since boot of one core, or of all cores when ``cpu`` is None."""
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    wanted = "cpu" if cpu is None else f"cpu{cpu}"
    for line in lines:
        name, *values = line.split()
        if name == wanted:
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]  # idle + iowait
            return sum(numbers) - idle, sum(numbers)
    return None


def children_seconds() -> float:
    """CPU seconds of this process's finished children (the load generators once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """CPU use between ``start()`` and ``stop()``, as shares of one core.

    ``target_share``: the target's processes. ``load_core_busy``: the load core, whatever ran on
    it. ``other_share``: machine-wide CPU time of processes that are not part of the benchmark
    (neither target, backends, nor the load generators run meanwhile), which disturbs it.
    """

    target_pids: list[int]
    backend_pids: list[int]
    load_cpu: int | None
    target_share: float | None = None
    load_core_busy: float | None = None
    other_share: float | None = None
    target_seconds: float | None = None  # the target's CPU seconds in the window
    wall_s: float | None = None
    _start: dict[str, float] = field(default_factory=dict)
    _core: tuple[int, int] | None = None

    def _sample(self) -> dict[str, float]:
        machine = core_ticks(None)
        return {
            "wall": time.monotonic(),
            "target": process_seconds(self.target_pids),
            "ours": process_seconds({*self.target_pids, *self.backend_pids}) + children_seconds(),
            "machine": machine[0] / CLOCK_TICKS if machine else math.nan,
        }

    def start(self) -> None:
        self._core = core_ticks(self.load_cpu) if self.load_cpu is not None else None
        self._start = self._sample()

    def stop(self) -> None:
        end = self._sample()
        wall = end["wall"] - self._start["wall"]
        if wall <= 0:
            return
        self.wall_s = wall
        if self.target_pids:
            self.target_seconds = end["target"] - self._start["target"]
            self.target_share = self.target_seconds / wall
        busy = (end["machine"] - self._start["machine"]) / wall
        if not math.isnan(busy):
            self.other_share = max(0.0, busy - (end["ours"] - self._start["ours"]) / wall)
        if self._core is not None and self.load_cpu is not None:
            core = core_ticks(self.load_cpu)
            if core is not None and core[1] > self._core[1]:
                self.load_core_busy = (core[0] - self._core[0]) / (core[1] - self._core[1])
