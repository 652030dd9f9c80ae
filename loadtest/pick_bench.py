"""Balancing cost: one pick per policy, and the rebuild on a pool change, by pool size.

Run from the repository root::

    python -m loadtest.pick_bench                       # 10, 100 and 1,000 backends
    python -m loadtest.pick_bench --sizes 10,5000 --repeat 9

Every pick goes through `Balancer.pick` as the server calls it: a realistic gRPC header list
(the sticky or pin header last, so the scan is the worst case), an empty `exclude` (a
call's first try), a `usable` callback doing a dict lookup like the connection pool's, and
an in-flight count for every backend. Sticky picks cycle through 4,096 distinct keys so the
ring lookups are not one cached path. Figures are the best of `--repeat` batches, in
microseconds per pick (timeit), so they are the cost on an idle core, not under load.

Rebuild figures: the per-snapshot table every policy uses (weights, the policy's state),
a consistent-hash ring built from scratch, and a ring derived from the previous one when
one backend leaves or joins (what a pool change costs a sticky balancer). All in
milliseconds, best of `--repeat`.

This is a benchmark, not a test: it never judges speed. It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from proxy.core.balancing import Balancer
from proxy.core.balancing.policies import POLICIES
from proxy.core.balancing.ring import HashRing
from proxy.core.balancing.table import PoolTable
from proxy.core.endpoints import Endpoint, PoolSnapshot
from proxy.core.h2.events import HeaderList

STICKY = b"x-session"
PIN = b"x-instance"
KEYS = 4096
BASE_HEADERS: HeaderList = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo.Echo/UnaryEcho"),
    (b":authority", b"proxy:8080"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
    (b"user-agent", b"grpc-go/1.64.0"),
]


@dataclass(frozen=True)
class Case:
    label: str
    balancer: Callable[[], Balancer]
    weighted: bool
    headers: Callable[[int], HeaderList]  # the i-th call's headers, for a pool of n


def no_header(n: int) -> HeaderList:
    return BASE_HEADERS


def sticky_header(i: int) -> HeaderList:
    return [*BASE_HEADERS, (STICKY, b"session-%d" % (i % KEYS))]


def address(i: int) -> str:
    return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:50051"


def pin_header_of(n: int) -> Callable[[int], HeaderList]:
    return lambda i: [*BASE_HEADERS, (PIN, b"instance-%d" % (i % n))]


def cases(n: int) -> list[Case]:
    def make(
        policy: str,
        sticky_header: bytes | None = None,
        pin_header: bytes | None = None,
        bounded_load: float | None = None,
    ) -> Callable[[], Balancer]:
        return partial(
            Balancer, policy, sticky_header, pin_header, bounded_load, rng=random.Random(1)
        )

    rows: list[Case] = []
    for policy in POLICIES:
        rows.append(Case(policy, make(policy), False, no_header))
    for policy in POLICIES:
        rows.append(Case(f"{policy} (weights 1..4)", make(policy), True, no_header))
    rows.append(Case("sticky", make("round_robin", sticky_header=STICKY), False, sticky_header))
    rows.append(
        Case(
            "sticky + bounded load 1.25",
            make("round_robin", sticky_header=STICKY, bounded_load=1.25),
            False,
            sticky_header,
        )
    )
    rows.append(Case("pin", make("round_robin", pin_header=PIN), False, pin_header_of(n)))
    return rows


def make_pool(n: int, weighted: bool) -> PoolSnapshot:
    eps = tuple(
        Endpoint(
            address(i),
            f"svc/{address(i)}",
            {"id": f"instance-{i}", "weight": 1 + i % 4 if weighted else 1},
        )
        for i in range(n)
    )
    return PoolSnapshot("svc", eps, 1, "", frozenset(e.address for e in eps))


def time_picks(case: Case, n: int, batch: int, repeat: int) -> float:
    """Best µs per pick over `repeat` batches of `batch` picks."""
    snap = make_pool(n, case.weighted)
    balancer = case.balancer()
    rng = random.Random(2)
    # Busy but not skewed, so bounded load mostly takes its fast path, as it would.
    inflight = {e.address: rng.randint(1, 8) for e in snap.endpoints}
    in_backoff: dict[str, bool] = {}

    def usable(address: str) -> bool:
        return not in_backoff.get(address, False)

    exclude: set[str] = set()
    headers = [case.headers(i) for i in range(batch)]
    pick = balancer.pick
    pick(snap, headers[0], exclude, usable, inflight)  # builds the per-snapshot state

    def run() -> None:
        for h in headers:
            pick(snap, h, exclude, usable, inflight)

    best = min(timeit.Timer(run).repeat(repeat=repeat, number=1))
    return best / batch * 1e6


def time_ms(action: Callable[[], object], repeat: int) -> float:
    return min(timeit.Timer(action).repeat(repeat=repeat, number=1)) * 1e3


def build_policies(snap: PoolSnapshot) -> None:
    """What a Balancer builds for a new snapshot before its first pick (any policy)."""
    table = PoolTable.of(snap)
    for factory in POLICIES.values():
        factory(table, random.random)


def rebuild_rows(sizes: Sequence[int], repeat: int) -> list[tuple[str, list[float]]]:
    rows: dict[str, list[float]] = {
        "policy state (PoolTable + the 3 policies), equal weights": [],
        "policy state (PoolTable + the 3 policies), weights 1..4": [],
        "ring, built from scratch": [],
        "ring, one backend left (derived from the previous ring)": [],
        "ring, one backend joined (derived from the previous ring)": [],
    }
    for n in sizes:
        eps = make_pool(n, False).endpoints
        smaller = eps[: n // 2] + eps[n // 2 + 1 :]
        ring, ring_smaller = HashRing(eps), HashRing(smaller)
        actions: list[Callable[[], object]] = [
            partial(build_policies, make_pool(n, False)),
            partial(build_policies, make_pool(n, True)),
            partial(HashRing, eps),
            partial(HashRing, smaller, ring),
            partial(HashRing, eps, ring_smaller),
        ]
        for timing, action in zip(rows.values(), actions, strict=True):
            timing.append(time_ms(action, repeat))
    return list(rows.items())


def markdown(
    title: str, unit: str, sizes: Sequence[int], rows: Sequence[tuple[str, list[float]]]
) -> str:
    head = f"| {title} | " + " | ".join(f"{n:,} backends ({unit})" for n in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    lines = [head, rule]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_figure(v) for v in values) + " |")
    return "\n".join(lines)


def _figure(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.pick_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes",
        default="10,100,1000",
        type=lambda text: [int(part) for part in text.split(",")],
        help="pool sizes, comma-separated (default 10,100,1000)",
    )
    parser.add_argument("--batch", type=int, default=20_000, help="picks per timed batch")
    parser.add_argument("--repeat", type=int, default=5, help="batches; the best one counts")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes: list[int] = args.sizes
    labels = [case.label for case in cases(1)]
    picks: dict[str, list[float]] = {label: [] for label in labels}
    for n in sizes:
        for case in cases(n):
            picks[case.label].append(time_picks(case, n, args.batch, args.repeat))
    print(
        f"Python {platform.python_version()} ({sys.implementation.name}), "
        f"{platform.machine()}, best of {args.repeat} batches of {args.batch:,} picks\n"
    )
    print(markdown("policy: one pick", "µs", sizes, list(picks.items())))
    print()
    print(markdown("on a pool change", "ms", sizes, rebuild_rows(sizes, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
