"""hpack's HeaderTable, counting its changes: the key of the caches in hpack_cache.py.

This module stays pure Python in the compiled build (setup.py leaves it out). hpack is
untyped, so to mypy and mypyc its HeaderTable is `Any`: compiled, this subclass would be a
native class laid out as if its base were `object`, and hpack's own attributes would be
written past its end. That was the segfault of the first attempt to compile the codec. As a
Python class it inherits the base's layout as Python does, and its property override works
(mypyc supports neither on a non-native class).
"""

from __future__ import annotations

from hpack.table import HeaderTable


class GenerationTable(HeaderTable):  # type: ignore[misc]
    """A HeaderTable that counts its changes."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)
