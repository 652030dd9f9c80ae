"""Discovery: backends registered in etcd (the gRPC naming format) become target pools.

``values`` parses etcd values and applies changes (pure), ``etcd`` is the only module that
talks to etcd, ``watcher`` keeps pools in sync, ``registration`` registers a backend,
``embedded`` runs a local etcd, and ``commands`` holds the CLI's discovery commands.
"""

from proxy.core.backoff import Backoff
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig, EtcdError, EtcdUnavailable, etcd_config
from proxy.discovery.registration import Registration
from proxy.discovery.watcher import EtcdDiscovery, TargetWatch, WatchState

__all__ = [
    "Backoff",
    "EtcdClient",
    "EtcdConfig",
    "EtcdDiscovery",
    "EtcdError",
    "EtcdUnavailable",
    "Registration",
    "TargetWatch",
    "WatchState",
    "etcd_config",
]
