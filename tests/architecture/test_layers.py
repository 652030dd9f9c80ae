"""The package's layers, read from the imports of every module (including those under
TYPE_CHECKING): each layer imports only the ones below it, and the core does no I/O.

    proxy.core       sans-I/O: no asyncio, sockets, TLS, threads or grpc
    proxy.discovery  etcd; imports the core only
    proxy.runtime    asyncio adapters; imports the core (and discovery for its types)
    proxy.ops        admin and metrics; reads the runtime, never the app
    proxy.app        config, wiring, lifecycle, supervisor, logs
    proxy.cli        argparse and dispatch
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

# Modules the core may not import: anything that waits on or touches the outside world.
IO_MODULES = {
    "asyncio",
    "uvloop",
    "socket",
    "ssl",
    "selectors",
    "threading",
    "subprocess",
    "multiprocessing",
    "grpc",
    "etcd3aio",
    "signal",
}
# For each layer, the proxy packages it must not import.
FORBIDDEN = {
    "proxy.core": {"proxy.runtime", "proxy.discovery", "proxy.ops", "proxy.app", "proxy.cli"},
    "proxy.discovery": {"proxy.runtime", "proxy.ops", "proxy.app", "proxy.cli"},
    "proxy.runtime": {"proxy.ops", "proxy.app", "proxy.cli"},
    "proxy.ops": {"proxy.app", "proxy.cli"},
    "proxy.app": {"proxy.cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from proxy.core import options`: the module imported is proxy.core.options
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_layers_are_all_there() -> None:
    """The rule below would pass on an empty tree: check it reads the real one."""
    names = {module_name(p) for p in MODULES}
    assert {"proxy.core.call", "proxy.runtime.downstream", "proxy.app.config"} <= names
    assert len([n for n in names if within(n, "proxy.core")]) >= 20


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    name = module_name(path)
    imported = imports_of(path)
    for layer, forbidden in FORBIDDEN.items():
        if within(name, layer):
            bad = sorted(i for i in imported if any(within(i, f) for f in forbidden))
            assert not bad, f"{name} ({layer}) imports {bad}"
    if within(name, "proxy.core"):
        io = sorted(i for i in imported if i.split(".")[0] in IO_MODULES)
        assert not io, f"{name} is in the sans-I/O core but imports {io}"


def test_only_the_cli_reaches_the_examples() -> None:
    """The echo service and the demo are another distribution (examples/): the proxy's own
    modules never import them, except the `demo` subcommand's lazy import."""
    reaching = {
        module_name(p) for p in MODULES if any(within(i, "proxy_examples") for i in imports_of(p))
    }
    assert reaching <= {"proxy.cli"}, reaching


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from proxy.runtime.upstream import BackendConnection\n"
        "import asyncio\n"
    )
    assert {"proxy.runtime.upstream", "asyncio"} <= imports_of(bad)
