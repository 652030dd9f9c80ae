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
from proxy.build_info import LIBRARY, PROBES, build_info

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
    # The library build_info's stale check reads is the one setup.py names.
    assert f'group_name="{LIBRARY.removesuffix("__mypyc")}"' in (REPO_ROOT / "setup.py").read_text()
    # Left out of proxy/core on purpose: the module that subclasses hpack's untyped table,
    # and the packages' __init__ files (re-exports).
    core = {
        _module_name(str(p.relative_to(REPO_ROOT)))
        for p in (REPO_ROOT / "proxy" / "core").rglob("*.py")
    }
    assert core - compiled == {
        "proxy.core",
        "proxy.core.balancing",
        "proxy.core.h2",
        "proxy.core.h2.hpack_table",
    }
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


def _wheel_files(tmp_path: Path, env: dict[str, str]) -> tuple[list[str], str]:
    """Build the project's wheel as `pip wheel` does, from a copy of the sources (a checkout
    holds compiled modules and a build/ directory that are not the point here), without build
    isolation (this venv's setuptools and mypy: no network), and list what it holds."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "proxy",
        source / "proxy",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
    out = subprocess.run(
        [*command, "--wheel-dir", str(tmp_path / "wheel"), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheel").glob("grpc_etcd_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist(), out.stdout + out.stderr


@pytest.mark.parametrize("why", ["GRPC_ETCD_PROXY_PURE", "no C compiler"])
def test_without_a_compiler_or_with_the_switch_the_wheel_is_pure_python(
    tmp_path: Path, why: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ETCD_PROXY_PURE"}
    if why == "GRPC_ETCD_PROXY_PURE":
        env["GRPC_ETCD_PROXY_PURE"] = "1"
    else:
        # A PATH with python but without the compiler sysconfig names.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
        env["PATH"] = str(bin_dir)
    files, output = _wheel_files(tmp_path, env)
    assert not [f for f in files if f.endswith(tuple(EXTENSION_SUFFIXES))], files
    assert "proxy/core/call.py" in files and "proxy/runtime/downstream.py" in files
    assert "installing pure Python" in output, output
