"""Which build of the data path runs: compiled with mypyc, or pure Python.

Read from the modules themselves (an extension module's file ends in an extension suffix), so
it is what was imported, not what was meant to be built. `grpc-etcd-proxy --version`, the
start-up log and the grpc_proxy_build_info metric say it.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# The modules setup.py compiles whose speed matters most; if these are compiled, the build is.
PROBES = (
    "proxy.core.h2.connection",
    "proxy.core.call",
    "proxy.runtime.downstream",
    "proxy.runtime.upstream",
)


@dataclass(frozen=True)
class BuildInfo:
    compiled: int  # probe modules that are extension modules
    stale: tuple[str, ...]  # compiled modules older than their source (a dev tree)
    forced_pure: bool  # GRPC_ETCD_PROXY_PURE is set

    @property
    def kind(self) -> str:
        if self.compiled == len(PROBES):
            return "compiled"
        if self.compiled == 0:
            return "pure"
        return "mixed"

    def describe(self) -> str:
        if self.kind == "compiled":
            text = "compiled (mypyc)"
            if self.stale:
                text += f"; STALE, older than their source: {', '.join(self.stale)}"
            return text
        if self.kind == "pure":
            return "pure Python (GRPC_ETCD_PROXY_PURE)" if self.forced_pure else "pure Python"
        return f"mixed: {self.compiled} of {len(PROBES)} data-path modules compiled"


def _is_extension(path: str) -> bool:
    return any(path.endswith(suffix) for suffix in EXTENSION_SUFFIXES)


def _in_source_tree(module: Path) -> bool:
    """The module is in a checkout (its package's parent holds setup.py), not installed."""
    package_root = module.parent
    while (package_root / "__init__.py").is_file():
        package_root = package_root.parent
    return (package_root / "setup.py").is_file()


# The shared library mypyc builds (setup.py's group name), imported by every module shim.
LIBRARY = "proxy.compiled__mypyc"


def _built_at(shim: Path) -> float:
    """When the compiled code behind a module was built: mypyc puts it in one shared library
    (LIBRARY), and rebuilds leave unchanged module shims alone."""
    built = shim.stat().st_mtime
    library = getattr(sys.modules.get(LIBRARY), "__file__", None)
    if library:
        built = max(built, Path(library).stat().st_mtime)
    return built


def build_info() -> BuildInfo:
    compiled = 0
    stale: list[str] = []
    for name in PROBES:
        module = importlib.import_module(name)
        path = getattr(module, "__file__", None) or ""
        if not _is_extension(path):
            continue
        compiled += 1
        # A source tree built in place (make compile) keeps its .py beside the .so: one
        # edited since is not what runs. Only there: pip writes an installed wheel's files
        # in any order, with the time of the install, so their ages mean nothing.
        source = Path(path).with_name(Path(path).name.split(".", 1)[0] + ".py")
        if (
            _in_source_tree(Path(path))
            and source.is_file()
            and source.stat().st_mtime > _built_at(Path(path))
        ):
            stale.append(name)
    forced = os.environ.get("GRPC_ETCD_PROXY_PURE", "") not in ("", "0")
    return BuildInfo(compiled, tuple(stale), forced)
