"""An import hook that loads proxy's modules from their .py files, never the compiled ones.

Python's path finder prefers an extension module to a source file of the same name, so with a
compiled build installed, `proxy.core.call` is the mypyc one. This finder goes first on
sys.meta_path and answers for every `proxy.*` module with its source file. Installed by
proxy/__init__.py when GRPC_ETCD_PROXY_PURE is set; child processes inherit the variable.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType


class SourceOnly(MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if not fullname.startswith("proxy.") or path is None:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            package = Path(entry, leaf)
            init = package / "__init__.py"
            if init.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, init, submodule_search_locations=[str(package)]
                )
            module = Path(entry, f"{leaf}.py")
            if module.is_file():
                return importlib.util.spec_from_file_location(fullname, module)
        return None  # not ours to find (a compiled-only module would be: there is none)


def install() -> None:
    if not any(isinstance(finder, SourceOnly) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceOnly())
