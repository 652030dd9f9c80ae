"""Multi-core scaling: calls/s through the proxy with `--workers 1` against `--workers 2`, side
by side in one run.

Run from the repository root::

    python -m loadtest.workers_bench                     # 3 rounds of 5 s per mode, ~1 minute
    python -m loadtest.workers_bench --rounds 5 --duration 10

Two loadtest/goecho backends (built with `go build` if loadtest/bin/goecho is missing), h2load
(one thread) and the proxy under test all run unpinned: two workers need both cores, so
nothing can have a core of its own. On a 2-core machine the load generator and the backends
therefore take CPU from the workers, and the ratio measures what a second worker gains on
that machine, not how the proxy scales on cores of its own.

Both proxies run at once with the same two `--backend`s, `--log-level warning` and
`--access-log-sample 0` (no access log line per call, which would measure the logger), one
load at a time:

- 1 worker:  `python -m proxy serve ... --workers 1`,
- 2 workers: `python -m proxy serve ... --workers 2` (a supervisor and two workers sharing the
  port with SO_REUSEPORT; measured once its admin /readyz says both workers are ready).

Each run is the main benchmark's "small unary 16 B" call (loadtest/bench.py): h2load posting
one 16-byte gRPC message per call to /echo.Echo/UnaryEcho, here over 16 connections x 8
streams: the kernel spreads connections over the workers by a hash of their addresses, so more
connections split more evenly. The "worker CPU split" column shows how the load fell. The
modes alternate and the order flips every round, so a drift of the machine over the run
favours neither. The table gives each mode's median calls/s, the rounds, the proxy's CPU (all
its processes, in cores), how busy the whole machine was, the CPU that processes outside the
benchmark took meanwhile ("others"; a round where they took 0.1 core or more is marked
"disturbed"; such a run is measured again up to `--retries` times, keeping the least
disturbed), and the ratio 2 workers / 1 worker.

This is a benchmark, not a test: it never judges speed. Exit status: 0 when every run was clean,
1 when some run had errors (its figures are shown and marked), 2 when it could not set up (a
missing tool, a failed build, a backend or proxy that would not start), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from loadtest import procs, rounds
from loadtest.bench import Backends, Target, start_backends
from loadtest.procs import log
from loadtest.rounds import Run, Setup

CLIENTS = 16
STREAMS = 8
MODES = (1, 2)
DISTURBED_CORES = 0.1  # CPU of processes outside the benchmark that makes a round suspect


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.workers_bench",
        description="calls/s through the proxy with --workers 1 vs --workers 2, one table.",
    )
    rounds.add_round_args(parser)
    parser.add_argument("--clients", type=int, default=CLIENTS, help="h2load connections (-c)")
    parser.add_argument("--streams", type=int, default=STREAMS, help="streams each (-m)")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a disturbed run again up to this many times, keeping the least "
        "disturbed (default %(default)s)",
    )
    rounds.add_setup_args(parser, startup_timeout=30.0, logs="workers-logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 1 or args.streams < 1:
        parser.error("--rounds, --clients and --streams must be at least 1")
    rounds.check_timing(parser, args)
    return args


def proxy_argv(workers: int, listen: str, admin: str, backends: Backends) -> list[str]:
    argv = [sys.executable, "-m", "proxy", "serve", "--listen", listen, "--admin", admin]
    argv += ["--workers", str(workers), "--log-level", "warning", "--access-log-sample", "0"]
    for address in backends.addresses:
        argv += ["--backend", address]
    return argv


def wait_ready(admin: str, timeout_s: float) -> str | None:
    """None once the admin endpoint's /readyz answers 200, else why not."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return None
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace").strip()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    return f"/readyz not 200 within {timeout_s:.0f} s: {last}"


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def measure(setup: Setup, target: Target, backends: Backends, workers: int) -> Run[int]:
    """One run; its split is between the worker processes (the supervisor does no relaying)."""
    worker_pids = children(target.pids[0]) if workers > 1 else list(target.pids)
    return rounds.measure(setup, target, backends, workers, worker_pids)


def table(runs: Sequence[Run[int]], setup: Setup) -> str:
    def figures(mode_runs: Sequence[Run[int]]) -> str:
        cpu = rounds.cores(rounds.median(r.proxy_cpu for r in mode_runs))
        busy = rounds.pct(rounds.median(r.machine_busy for r in mode_runs))
        others = rounds.cores(rounds.median(r.others for r in mode_runs))
        return f"{cpu} | {busy} | {others} | {rounds.split_text(mode_runs)}"

    return rounds.table(
        setup,
        runs,
        MODES,
        (
            "| workers | calls/s (median) | rounds | proxy CPU (cores) | machine busy "
            "| others (cores) | worker CPU split | vs 1 worker |",
            "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
        ),
        figures,
        mark=_mark,
        ratio="2 workers / 1 worker",
        load="",
        notes=[
            "- backends: 2 x loadtest/goecho; proxies with --log-level warning "
            "--access-log-sample 0",
            "- pinning: none: proxy workers, backends and h2load share all the cores",
        ],
    )


def _disturbed(run: Run[int]) -> bool:
    return run.others is not None and run.others >= DISTURBED_CORES


def _mark(run: Run[int]) -> str:
    if run.problems:
        return " (ERRORS)"
    if _disturbed(run):
        return f" (disturbed: {run.others:.2f} cores)"
    return ""


def run_all(setup: Setup, sup: procs.Supervisor, goecho: Path) -> list[Run[int]]:
    args = setup.args
    backends = start_backends(sup, goecho, 2, None, args.startup_timeout)
    targets: dict[int, Target] = {}
    for workers in MODES:
        port = procs.free_port()
        admin = f"127.0.0.1:{procs.free_port()}"
        name = f"proxy-{workers}w"
        argv = proxy_argv(workers, f"127.0.0.1:{port}", admin, backends)
        ready = functools.partial(wait_ready, admin, args.startup_timeout)
        targets[workers] = rounds.start_proxy(setup, sup, name, argv, port, name, ready)
    runs: list[Run[int]] = []
    for n, workers in rounds.alternate(args.rounds, MODES):
        run = measure(setup, targets[workers], backends, workers)
        for _ in range(args.retries):
            if not _disturbed(run):
                break
            log(f"round {n} workers={workers}: disturbed, measuring again")
            again = measure(setup, targets[workers], backends, workers)
            run = min(run, again, key=lambda r: r.others or 0.0)
        runs.append(rounds.logged(run, f"round {n} workers={workers}"))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def setup(h2load_path: str, body: Path) -> Setup:
        return Setup(args, h2load_path, body, args.clients, args.streams)

    return rounds.main(args, "workers-bench-", setup, run_all, table)


if __name__ == "__main__":
    sys.exit(main())
