"""Batches writes: every connection touched while handling reads is written once, at the end.

Handling one read from a client usually produces output for a backend connection and the
client itself; handling many reads in one loop iteration produces output for the same few
connections again and again. Marking connections dirty and writing each once per iteration
turns many small writes (syscalls) into few larger ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from proxy.runtime.protocol import H2Protocol


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
        # Bound once: compiled, `self._loop.call_soon(self._run)` looks the method up by name
        # and makes a new bound method on every turn.
        self._call_soon: Callable[[Callable[[], None]], object] = loop.call_soon
        self._run_cb: Callable[[], None] = self._run
        self._after: list[Callable[[], None]] = []  # see after_writes

    def mark(self, writer: Writer) -> None:
        """Write `writer` at the end of this loop turn. Called once per turn and writer: the
        writer calls it only when it was not dirty yet."""
        self._dirty.append(writer)
        if not self._scheduled:
            self._schedule()

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Run `fn` once at the end of this loop turn, after the writers are written: for
        work that no peer has to wait for, such as a finished call's stats and access log
        line. Done before the writes, that work delays the bytes that end the call."""
        self._after.append(fn)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        self._call_soon(self._run_cb)

    def _run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            if isinstance(writer, H2Protocol):
                writer.flush()  # compiled: a native call (through Writer, a Python one)
            else:
                writer.flush()
        if self._after:
            after, self._after = self._after, []
            for fn in after:
                fn()
