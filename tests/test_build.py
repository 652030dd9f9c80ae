"""Which build of the data path runs (compiled with mypyc, or pure Python), and that it says so.

`make test` runs the whole suite with EXPECT_BUILD=compiled after `make compile`, and
the codec, relay and conformance tests again with GRPC_ETCD_PROXY_PURE=1 and
EXPECT_BUILD=pure: the first test here fails if the build that runs is not the one
that job means to test (a compile step that silently fell back to pure Python, a stale build).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import proxy
from proxy.build_info import PROBES, build_info

REPO_ROOT = Path(__file__).resolve().parent.parent


def _compiled_setup_list() -> list[str]:
    """The COMPILED list of setup.py, read without running setup()."""
    source = (REPO_ROOT / "setup.py").read_text()
    start = source.index("COMPILED = [")
    block = source[start : source.index("]", start)]
    return [line.strip().strip('",') for line in block.splitlines()[1:] if line.strip()]


def _module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def test_the_build_that_runs_is_the_one_this_job_tests() -> None:
    expect = os.environ.get("EXPECT_BUILD", "")
    info = build_info()
    if not expect:
        pytest.skip("EXPECT_BUILD is not set (make test sets it: compiled, then pure)")
    assert info.kind == expect, info.describe()
    assert not info.stale, f"run `make compile`: {info.describe()}"
    if expect == "compiled":
        # Every module setup.py compiles, not only the probes.
        for path in _compiled_setup_list():
            module = importlib.import_module(_module_name(path))
            assert module.__file__ is not None
            assert module.__file__.endswith(tuple(EXTENSION_SUFFIXES)), module.__file__


def test_the_pure_switch_loads_every_module_from_source() -> None:
    code = (
        "import sys, proxy.runtime.downstream, proxy.core.call;"
        "from proxy.build_info import build_info;"
        "bad = [m.__name__ for n, m in list(sys.modules.items())"
        " if n.startswith('proxy.') and not (m.__file__ or '').endswith('.py')];"
        "print(build_info().kind, bad)"
    )
    env = {**os.environ, "GRPC_ETCD_PROXY_PURE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["pure", "[]"], out.stdout + out.stderr


def test_version_names_the_build() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, check=True
    )
    info = build_info()
    assert out.stdout.strip() == f"grpc-etcd-proxy {proxy.__version__} ({info.describe()})"
    want = "compiled (mypyc)" if info.kind == "compiled" else "pure Python"
    assert want in out.stdout


def test_setup_compiles_what_the_build_info_probes_and_the_makefile_watches() -> None:
    compiled = {_module_name(p) for p in _compiled_setup_list()}
    assert set(PROBES) <= compiled
    # The one module of proxy/core left out on purpose: it subclasses hpack's untyped table.
    core = {
        _module_name(str(p.relative_to(REPO_ROOT)))
        for p in (REPO_ROOT / "proxy" / "core").rglob("*.py")
    }
    assert core - compiled == {"proxy.core.h2.hpack_table"}
    makefile = (REPO_ROOT / "Makefile").read_text()
    for path in _compiled_setup_list():
        if path.startswith("proxy/runtime/"):
            assert path in makefile, f"Makefile's COMPILED_SRC misses {path}"


def test_the_stale_check_looks_only_at_a_source_tree(tmp_path: Path) -> None:
    from proxy.build_info import _in_source_tree

    for root in ("checkout", "site-packages"):
        package = tmp_path / root / "proxy" / "core"
        package.mkdir(parents=True)
        (package.parent / "__init__.py").touch()
        (package / "__init__.py").touch()
    (tmp_path / "checkout" / "setup.py").touch()
    shim = "call.cpython-311-x86_64-linux-gnu.so"
    assert _in_source_tree(tmp_path / "checkout" / "proxy" / "core" / shim)
    # An installed wheel: pip's file times say nothing about which is older.
    assert not _in_source_tree(tmp_path / "site-packages" / "proxy" / "core" / shim)
