"""grpc-etcd-proxy: an L7 gRPC proxy that balances every call over backends found in etcd."""

import os as _os

__version__ = "0.1.0"

# GRPC_ETCD_PROXY_PURE=1 runs the pure-Python modules even where the compiled ones are
# installed beside them (the test job for the pure build, and a way out if a compiled build
# misbehaves). It must act before any submodule is imported, so it lives here.
if _os.environ.get("GRPC_ETCD_PROXY_PURE", "") not in ("", "0"):
    from proxy._source_only import install as _install

    _install()
