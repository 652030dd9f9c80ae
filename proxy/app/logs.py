"""Log setup for every subcommand: structlog lines on stderr, JSON or for a human.

`json` is one object per line (what a log shipper wants; the default when stderr is not a
terminal, as in a container); `console` is aligned, coloured `key=value` text (the default on
a terminal). Both carry `timestamp` (ISO 8601, UTC), `level`, `logger` and `event`.

Records of the standard library's logging (grpcio, asyncio, anything else) go through the same
renderer, so a process writes one format only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console")


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that knows the name it was asked for, so lines say which module wrote
    them (`proxy.access`, `proxy.server`, ...)."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name
        self._out = file

    def msg(self, message: str) -> None:
        # One write of the whole line: print() writes the text and the newline apart, and
        # workers sharing the supervisor's stderr pipe then glued each other's lines together
        # (a write of up to PIPE_BUF bytes to a pipe is atomic; two writes are not).
        with self._lock:
            self._out.write(message + "\n")
            self._out.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        name = args[0] if args and isinstance(args[0], str) else "proxy"
        return _NamedPrintLogger(self._file, name)


def resolve_format(log_format: str | None, stream: TextIO | None = None) -> str:
    """`log_format`, or the default for `stream` (console on a terminal, else json)."""
    if log_format is not None:
        return log_format
    stream = stream or sys.stderr
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream: a machine reads it
        return "json"


def configure(
    level: str = "info",
    log_format: str | None = None,
    stream: TextIO | None = None,
    fields: Mapping[str, Any] | None = None,
) -> str:
    """Set up structlog and the standard library's logging; returns the format chosen.
    `fields` go on every line (a worker's index, so that its lines can be told apart)."""
    stream = stream or sys.stderr
    fmt = resolve_format(log_format, stream)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"expected one of {', '.join(LEVELS)}, got {level!r}")
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fields:
        shared.insert(0, _Fields(dict(fields)))
    renderer: Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream))
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_LoggerFactory(stream),
        processors=[*shared, renderer],
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return fmt


class _Fields:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __call__(self, _logger: Any, _method: str, event: EventDict) -> EventDict:
        for key, value in self.fields.items():
            event.setdefault(key, value)
        return event


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
