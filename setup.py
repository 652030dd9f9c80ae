"""Builds the compiled data path with mypyc, or installs pure Python.

`pip install .` on a machine with a C compiler compiles the modules in COMPILED with mypyc
(the way black and mypy ship). Without a compiler, or with GRPC_ETCD_PROXY_PURE=1 in the
environment, it installs the same modules as pure Python, which behave the same:
`grpc-etcd-proxy --version` and the start-up log say which one runs (proxy/build_info.py).
Everything else (metadata, dependencies, the console script) is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

from setuptools import setup

# The data path: the codec, the call, balancing, and the asyncio adapters a call runs through
# (gRPC-Web's HTTP/1.1 front end among them). Left out on purpose:
# - proxy/core/h2/hpack_table.py: it subclasses hpack's untyped HeaderTable (its docstring);
# - the packages' __init__.py files: re-exports only, and compiled with the library inside the
#   package, mypyc would give them a wrong __path__;
# - everything that runs once per connection or less (discovery, TLS setup, the listener,
#   admin), where compiling buys nothing and costs build time.
COMPILED = [
    "proxy/core/backoff.py",
    "proxy/core/buffers.py",
    "proxy/core/call.py",
    "proxy/core/endpoints.py",
    "proxy/core/grpc_status.py",
    "proxy/core/grpcweb.py",
    "proxy/core/identity.py",
    "proxy/core/options.py",
    "proxy/core/outlier.py",
    "proxy/core/ports.py",
    "proxy/core/retry_budget.py",
    "proxy/core/routing.py",
    "proxy/core/stats.py",
    "proxy/core/units.py",
    "proxy/core/waiting.py",
    "proxy/core/web_call.py",
    "proxy/core/h2/connection.py",
    "proxy/core/h2/errors.py",
    "proxy/core/h2/events.py",
    "proxy/core/h2/frames.py",
    "proxy/core/h2/hpack_cache.py",
    "proxy/core/h2/limits.py",
    "proxy/core/h2/validation.py",
    "proxy/core/balancing/balancer.py",
    "proxy/core/balancing/metadata.py",
    "proxy/core/balancing/pin.py",
    "proxy/core/balancing/policies.py",
    "proxy/core/balancing/ring.py",
    "proxy/core/balancing/table.py",
    "proxy/runtime/dispatcher.py",
    "proxy/runtime/downstream.py",
    "proxy/runtime/flusher.py",
    "proxy/runtime/http1.py",
    "proxy/runtime/pool.py",
    "proxy/runtime/protocol.py",
    "proxy/runtime/upstream.py",
]


def _want_compiled() -> bool:
    if os.environ.get("GRPC_ETCD_PROXY_PURE", "") not in ("", "0"):
        print("setup.py: GRPC_ETCD_PROXY_PURE is set: installing pure Python", file=sys.stderr)
        return False
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        print(f"setup.py: no C compiler ({compiler}): installing pure Python", file=sys.stderr)
        return False
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        print("setup.py: mypyc is not installed: installing pure Python", file=sys.stderr)
        return False
    return True


def _ext_modules() -> list[object]:
    if not _want_compiled():
        return []
    from mypyc.build import mypycify

    # opt_level 3 is mypyc's default; debug_level 0 keeps the shared library small. The
    # group name puts that library inside the package (proxy/compiled__mypyc.*.so), not at
    # the top of site-packages or of the checkout, where an editable install cannot see it.
    return list(mypycify(COMPILED, opt_level="3", debug_level="0", group_name="proxy.compiled"))


setup(ext_modules=_ext_modules())
