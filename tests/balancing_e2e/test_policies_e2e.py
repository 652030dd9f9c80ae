"""Load policies through real proxy processes: least_request keeps calls off a slow backend
that round_robin keeps feeding, and weights registered in etcd metadata split round-robin
calls in proportion. Real grpcio backends and clients, a real etcd for the weights.

Shares are counted from which backend answered each call, never from how long anything took.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from backends import EchoBackendsFactory, open_channel
from balancing_e2e_support import (
    SlowBackendFactory,
    backend_of,
    count_backends,
    register,
)
from etcd_support import EtcdServer
from proxy_process import start_proxy, wait_for

CALLERS = 30
CALLS = 600
SLOW = "slow"


def _share_of_slow(channel: grpc.Channel) -> float:
    """CALLS calls from CALLERS concurrent closed-loop callers; the slow backend's share."""
    with ThreadPoolExecutor(max_workers=CALLERS) as callers:
        answered = Counter(callers.map(lambda _: backend_of(channel), range(CALLS)))
    assert sum(answered.values()) == CALLS
    return answered[SLOW] / CALLS


@pytest.mark.parametrize(
    ("policy", "low", "high"),
    [
        # Power of two choices on calls in flight: the slow backend, which holds each of its
        # calls for 200 ms, is the busier of almost every pair it is in. Expected a few %.
        ("least_request", 0.0, 0.20),
        # A rotation ignores how busy a backend is: every third call, exactly (+-1).
        ("round_robin", 0.32, 0.35),
    ],
)
def test_slow_backend_share_under_concurrent_callers(
    policy: str,
    low: float,
    high: float,
    echo_backends: EchoBackendsFactory,
    slow_backend: SlowBackendFactory,
) -> None:
    fast = echo_backends(2)
    slow = slow_backend(SLOW)
    args = ["serve", "--policy", policy, "--backend", slow]
    for server in fast:
        args += ["--backend", server.address]
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        everyone = {SLOW, *(s.name for s in fast)}
        # Connections to all three first, so that connecting costs no backend its share.
        wait_for(lambda: set(count_backends(channel, 9)) == everyone, "all 3 backends to answer")
        share = _share_of_slow(channel)
    assert low <= share < high, f"{policy}: the slow backend got {share:.1%} of {CALLS} calls"


def test_weights_from_etcd_metadata_split_round_robin_calls(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    """Weights 1:2:3 registered as {"weight": w}: 600 sequential round_robin calls split
    100/200/300. Smooth weighted round robin makes that exact (600 is 100 cycles of 6); the
    stated tolerance is +-10 calls each."""
    servers = echo_backends(3)
    for weight, server in enumerate(servers, start=1):
        register(etcd, f"svc/{server.name}", server.address, {"weight": weight})
    args = ["serve", "--etcd", etcd.endpoint, "--target", "svc", "--policy", "round_robin"]
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        names = {s.name for s in servers}
        wait_for(lambda: set(count_backends(channel, 12)) == names, "all 3 backends to answer")
        shares = count_backends(channel, 600)
    for weight, server in enumerate(servers, start=1):
        got = shares[server.name]
        assert abs(got - 100 * weight) <= 10, f"weight {weight}: {got} of 600 calls ({shares})"
