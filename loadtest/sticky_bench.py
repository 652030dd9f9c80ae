"""Sticky routing's end-to-end cost: calls/s through the proxy with and without
`--sticky-header`, side by side in one run.

Run from the repository root::

    python -m loadtest.sticky_bench                     # 3 rounds of 5 s per mode, ~1 minute
    python -m loadtest.sticky_bench --rounds 5 --duration 10

Two loadtest/goecho backends (built with `go build` if loadtest/bin/goecho is missing) and
h2load (one thread) run on the load core, cpu 1; two proxies run on the proxy core, cpu 0,
each under `taskset`, both with the same two `--backend`s:

- plain:  `python -m proxy serve ...` (round robin),
- sticky: `python -m proxy serve ... --sticky-header x-key`.

Each run is the main benchmark's "small unary 16 B, c=8 m=16" scenario (see loadtest/bench.py):
h2load posting one 16-byte gRPC message per call to /echo.Echo/UnaryEcho, 8 connections x 16
streams. Every call of both modes carries the header `x-key: abc` (h2load sends one fixed value),
so the two modes get the same bytes and differ only in what the proxy does with them: the plain
proxy never reads the header, the sticky one finds it, hashes it onto the ring and looks up the
owner on every call. With a single key every sticky call goes to one backend: the
"backend CPU" column shows the split (about even when plain, all on one when sticky), which is
the evidence that sticky routing was in effect. The proxy is alone on its core and was the
bottleneck when its CPU column is near 100 %; "load core" is how busy cpu 1 was (backends and
h2load): near 100 % there means the load side limited the run too. CPU columns are medians over
the rounds.

Only one proxy is under load at any time (the other idles); the modes alternate, and the order
flips every round, so a drift of the machine over the run does not favour one mode. The table
gives each mode's median calls/s over the rounds, the rounds themselves, and the ratio
sticky / plain (the median's ratio, and each round's).

This is a benchmark, not a test: it never judges speed. Exit status: 0 when every run was clean,
1 when some run had errors (its figures are shown and marked), 2 when it could not set up (a
missing tool, a failed build, a backend or proxy that would not start), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest import h2load, procs, rounds
from loadtest.bench import Backends, Pinning, Target, choose_pinning, start_backends
from loadtest.rounds import Run

STICKY_HEADER = "x-key"
CLIENTS = 8
STREAMS = 16
MODES = ("plain", "sticky")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sticky_bench",
        description="calls/s through the proxy with --sticky-header on vs off, one table.",
    )
    rounds.add_round_args(parser)
    parser.add_argument(
        "--key", default="abc", help=f"the {STICKY_HEADER} value every call carries"
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxies")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for backends and h2load")
    rounds.add_setup_args(parser, startup_timeout=20.0, logs="sticky-logs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rounds.check_timing(parser, args)
    return args


@dataclass(frozen=True)
class Setup(rounds.Setup):
    pinning: Pinning

    @property
    def header(self) -> str:
        return f"{STICKY_HEADER}: {self.args.key}"

    @property
    def load_cpu(self) -> int | None:
        return self.pinning.load_cpu

    def h2load_argv(self, target: Target, load: h2load.Load) -> list[str]:
        argv = super().h2load_argv(target, load)
        # h2load.argv ends with the URL; the sticky header goes with the others, before it.
        return procs.pinned([*argv[:-1], "-H", self.header, argv[-1]], self.pinning.load_cpu)


def proxy_argv(setup: Setup, mode: str, listen: str, backends: Backends) -> list[str]:
    # No admin endpoint: both proxies run at once and would contend for its default port.
    argv = [sys.executable, "-m", "proxy", "serve", "--listen", listen, "--admin", "off"]
    argv += ["--log-level", "warning"]
    for address in backends.addresses:
        argv += ["--backend", address]
    if mode == "sticky":
        argv += ["--sticky-header", STICKY_HEADER]
    return procs.pinned(argv, setup.pinning.proxy_cpu)


def table(runs: Sequence[Run[str]], setup: Setup) -> str:
    def figures(mode_runs: Sequence[Run[str]]) -> str:
        cpu = rounds.median(r.proxy_cpu for r in mode_runs)
        load = rounds.median(r.load_core for r in mode_runs)
        return f"{rounds.pct(cpu)} | {rounds.pct(load)} | {rounds.split_text(mode_runs)}"

    return rounds.table(
        setup,
        runs,
        MODES,
        (
            "| mode | calls/s (median) | rounds | proxy CPU | load core | backend CPU split "
            "| sticky / plain |",
            "| --- | ---: | --- | ---: | ---: | --- | ---: |",
        ),
        figures,
        mark=lambda run: " (ERRORS)" if run.problems else "",
        ratio="sticky / plain",
        load=f", header `{setup.header}` on every call (both modes)",
        notes=[
            "- backends: 2 x loadtest/goecho; sticky = `--sticky-header "
            f"{STICKY_HEADER}`, plain = round robin",
            f"- pinning: {_pinning(setup.pinning)}",
        ],
    )


def _pinning(pinning: Pinning) -> str:
    if pinning.proxy_cpu is None:
        return "none (taskset missing or fewer than 2 usable cores): everything shares cores"
    return f"proxies on cpu {pinning.proxy_cpu}; backends and h2load -t 1 on cpu {pinning.load_cpu}"


def run_all(setup: Setup, sup: procs.Supervisor, goecho: Path) -> list[Run[str]]:
    args = setup.args
    backends = start_backends(sup, goecho, 2, setup.load_cpu, args.startup_timeout)
    targets: dict[str, Target] = {}
    for mode in MODES:
        port = procs.free_port()
        argv = proxy_argv(setup, mode, f"127.0.0.1:{port}", backends)
        targets[mode] = rounds.start_proxy(setup, sup, mode, argv, port, f"{mode} proxy")
    return [
        rounds.logged(
            rounds.measure(setup, targets[mode], backends, mode, backends.pids),
            f"round {n} {mode}",
        )
        for n, mode in rounds.alternate(args.rounds, MODES)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def setup(h2load_path: str, body: Path) -> Setup:
        return Setup(args, h2load_path, body, CLIENTS, STREAMS, choose_pinning(args))

    return rounds.main(args, "sticky-bench-", setup, run_all, table)


if __name__ == "__main__":
    sys.exit(main())
