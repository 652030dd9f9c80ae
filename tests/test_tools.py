"""require_tool skips locally but fails under CI, so CI cannot pass by skipping."""

from __future__ import annotations

import pytest
import tools


def test_finds_a_tool_on_path() -> None:
    assert tools.find_tool("sh") is not None
    assert tools.find_tool("no-such-tool-xyz") is None


def test_missing_tool_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs no-such-tool-xyz"):
        tools.require_tool("no-such-tool-xyz")


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="needs no-such-tool-xyz"):
        tools.require_tool("no-such-tool-xyz")


def test_present_tool_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    path = tools.require_tool("sh")
    assert path.endswith("/sh")
