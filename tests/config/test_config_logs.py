"""proxy.app.logs: JSON lines unless stderr is a terminal, the level filter, and the standard
library's records (grpcio, asyncio) written in the same format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from proxy.app import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_when_not_a_terminal_with_stdlib_records_too() -> None:
    stream = io.StringIO()
    assert logs.configure("info", None, stream) == "json"
    structlog.get_logger("proxy.test").info("pool_changed", target="echo", endpoints=2)
    structlog.get_logger("proxy.test").debug("hidden")
    logging.getLogger("asyncio").warning("slow callback %s", "x")
    logging.getLogger("grpc").debug("hidden too")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2, lines
    ours, stdlib = lines
    assert ours["event"] == "pool_changed"
    assert ours["level"] == "info"
    assert ours["logger"] == "proxy.test"
    assert ours["target"] == "echo" and ours["endpoints"] == 2
    assert ours["timestamp"].endswith("Z")
    assert stdlib["event"] == "slow callback x"
    assert stdlib["level"] == "warning"
    assert stdlib["logger"] == "asyncio"


def test_console_on_a_terminal_and_the_level_filter() -> None:
    stream = Terminal()
    assert logs.configure("warning", None, stream) == "console"
    structlog.get_logger("proxy.test").info("hidden")
    structlog.get_logger("proxy.test").warning("backend_ejected", backend="127.0.0.1:1")
    text = stream.getvalue()
    assert "hidden" not in text
    assert "backend_ejected" in text and "127.0.0.1:1" in text
    assert not text.lstrip().startswith("{")


def test_an_explicit_format_wins_over_the_terminal() -> None:
    stream = Terminal()
    assert logs.configure("info", "json", stream) == "json"
    structlog.get_logger("x").info("e")
    assert json.loads(stream.getvalue())["event"] == "e"


def test_fields_on_every_line() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream, fields={"worker": 3})
    structlog.get_logger("x").info("e")
    logging.getLogger("grpc").warning("w")
    assert [json.loads(line)["worker"] for line in stream.getvalue().splitlines()] == [3, 3]
