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
    """A connection with output to write. It keeps its own `dirty` flag (set when it calls
    `Flusher.mark`, cleared when it flushes): compiled, a check of its own attribute is a C
    load, where the same check made here, through this protocol, is a Python attribute lookup
    (four per serial call)."""

    def flush(self) -> None: ...


class Flusher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Writer] = []
        self._scheduled = False

    def mark(self, writer: Writer) -> None:
        """Write `writer` at the end of this loop turn. Called once per turn and writer: the
        writer calls it only when it was not dirty yet."""
        self._dirty.append(writer)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush()
