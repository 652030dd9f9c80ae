"""Finding the external tools the tests need (h2spec, ghz, interop_client, haproxy, ...).

``make tools`` (``.ci/install-tools.sh``) puts the Go tools into ``<repo>/.tools/bin`` and
the Debian ones on PATH.  Import as ``from tools import require_tool``: ``tests/`` is on
``sys.path`` under pytest (see ``tests/backends.py``).

A test that needs a tool calls :func:`require_tool`: locally a missing tool skips the
test (naming the tool), but under CI (the ``CI`` environment variable is set) it fails,
so that CI can never go green by skipping what it should run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
GO_BIN = Path(os.environ.get("GOBIN") or Path.home() / "go" / "bin")


def _search_path() -> str:
    parts = [str(TOOLS_BIN), str(GO_BIN), os.environ.get("PATH", "")]
    return os.pathsep.join(p for p in parts if p)


def find_tool(name: str) -> str | None:
    """Absolute path of executable ``name`` in .tools/bin, ~/go/bin or PATH (in that order)."""
    return shutil.which(name, path=_search_path())


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """Path of ``name``; skips the test if missing locally, fails it if missing under CI."""
    path = find_tool(name)
    if path is not None:
        return path
    missing_tool(name)


def missing_tool(name: str, where: str = "") -> NoReturn:
    """Skip the test (locally) or fail it (under CI), naming the tool."""
    message = f"needs {name}{where} (install it with `make tools`, i.e. .ci/install-tools.sh)"
    if in_ci():
        pytest.fail(f"{message}; CI is set, so a missing tool is a failure", pytrace=False)
    pytest.skip(message)


def tool_env() -> dict[str, str]:
    """A copy of the environment with the tool directories in front of PATH."""
    env = dict(os.environ)
    env["PATH"] = _search_path()
    return env
