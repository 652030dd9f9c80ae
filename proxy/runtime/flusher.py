"""Batches writes: every connection touched while handling reads is written once, at the end.

Handling one read from a client usually produces output for a backend connection and the
client itself; handling many reads in one loop iteration produces output for the same few
connections again and again. Marking connections dirty and writing each once per iteration
turns many small writes (syscalls) into few larger ones.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Writer(Protocol):
    dirty: bool

    def flush(self) -> None: ...


class Flusher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Writer] = []
        self._scheduled = False

    def mark(self, writer: Writer) -> None:
        if writer.dirty:
            return
        writer.dirty = True
        self._dirty.append(writer)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.dirty = False
            writer.flush()
