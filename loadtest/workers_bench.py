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
import datetime as dt
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import h2load, procs, tools
from loadtest.bench import Backends, SetupError, Target, launch, log, start_backends
from loadtest.cpustat import CpuWindow, core_ticks, process_seconds
from loadtest.sticky_bench import goecho_binary

PAYLOAD = 16
CLIENTS = 16
STREAMS = 8
MODES = (1, 2)
PROBE_TIMEOUT_S = 10.0
DISTURBED_CORES = 0.1  # CPU of processes outside the benchmark that makes a round suspect


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.workers_bench",
        description="calls/s through the proxy with --workers 1 vs --workers 2, one table.",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per mode")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="h2load connections (-c)")
    parser.add_argument("--streams", type=int, default=STREAMS, help="streams each (-m)")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a disturbed run again up to this many times, keeping the least "
        "disturbed (default %(default)s)",
    )
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument(
        "--logs",
        type=Path,
        default=tools.LOADTEST / "out" / "workers-logs",
        help="where the logs of the processes it starts go (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 1 or args.streams < 1:
        parser.error("--rounds, --clients and --streams must be at least 1")
    if not args.duration > 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    return args


@dataclass(frozen=True)
class Setup:
    args: argparse.Namespace
    h2load_path: str
    body: Path

    def h2load_argv(self, target: Target, load: h2load.Load) -> list[str]:
        url = f"http://{target.address}{h2load.PATH}"
        return h2load.argv(self.h2load_path, url, self.body, load, None)

    def load(self, duration_s: float) -> h2load.Load:
        return h2load.Load(self.args.clients, self.args.streams, duration_s=duration_s)


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


def probe(setup: Setup, target: Target) -> str | None:
    """8 serial calls through the target; None if all came back whole."""
    argv = setup.h2load_argv(target, h2load.Load(clients=1, streams=1, requests=8))
    done = procs.run(argv, timeout_s=PROBE_TIMEOUT_S)
    if done.timed_out:
        return "probe calls timed out"
    try:
        found = h2load.problems(h2load.parse(done.stdout), setup.body.stat().st_size)
    except ValueError:
        return f"probe failed: {(done.stderr or done.stdout).strip()[-200:]}"
    return f"probe: {'; '.join(found)}" if found else None


@dataclass
class Run:
    workers: int
    calls_per_s: float
    proxy_cpu: float | None  # cores used by all the proxy's processes
    machine_busy: float | None  # share of all cores busy, whatever ran
    others: float | None  # cores used by processes outside the benchmark: a disturbance
    worker_split: list[float]  # each worker's share of the workers' CPU time
    problems: list[str] = field(default_factory=list)


def measure(setup: Setup, target: Target, backends: Backends, workers: int) -> Run:
    args = setup.args
    if args.warmup > 0:
        warm = setup.load(args.warmup)
        procs.run(setup.h2load_argv(target, warm), warm.budget_s(), cwd=tools.REPO)
    load = setup.load(args.duration)
    worker_pids = children(target.pids[0]) if workers > 1 else list(target.pids)
    window = CpuWindow(target.pids, backends.pids, None)
    before = [process_seconds([pid]) for pid in worker_pids]
    machine_before = core_ticks(None)
    window.start()
    done = procs.run(setup.h2load_argv(target, load), load.budget_s(), cwd=tools.REPO)
    window.stop()
    machine_after = core_ticks(None)
    used = [process_seconds([p]) - s for p, s in zip(worker_pids, before, strict=True)]
    total = sum(used)
    split = [u / total for u in used] if total > 0 else []
    busy = None
    if machine_before and machine_after and machine_after[1] > machine_before[1]:
        busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
    rate = 0.0
    if done.timed_out:
        found = ["h2load timed out"]
    else:
        try:
            report = h2load.parse(done.stdout)
        except ValueError:
            found = [f"h2load: {(done.stderr or done.stdout).strip()[-200:]}"]
        else:
            rate = report.req_per_s
            found = h2load.problems(report, setup.body.stat().st_size)
    return Run(workers, rate, window.target_share, busy, window.other_share, split, found)


def _pct(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.0%}"


def _cores(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.2f}"


def table(runs: Sequence[Run], setup: Setup) -> str:
    by_mode = {m: [r for r in runs if r.workers == m] for m in MODES}
    medians = {m: statistics.median(r.calls_per_s for r in rs) for m, rs in by_mode.items()}
    one = medians[1]
    lines = [
        "| workers | calls/s (median) | rounds | proxy CPU (cores) | machine busy "
        "| others (cores) | worker CPU split | vs 1 worker |",
        "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for mode, mode_runs in by_mode.items():
        rounds = ", ".join(f"{r.calls_per_s:,.0f}{_mark(r)}" for r in mode_runs)
        cpu = [r.proxy_cpu for r in mode_runs if r.proxy_cpu is not None]
        busy = [r.machine_busy for r in mode_runs if r.machine_busy is not None]
        others = [r.others for r in mode_runs if r.others is not None]
        ratio = "1.00" if mode == 1 else (f"{medians[mode] / one:.2f}" if one else "?")
        lines.append(
            f"| {mode} | {medians[mode]:,.0f} | {rounds} | "
            f"{_cores(statistics.median(cpu) if cpu else None)} | "
            f"{_pct(statistics.median(busy) if busy else None)} | "
            f"{_cores(statistics.median(others) if others else None)} | {_split(mode_runs)} | "
            f"{ratio} |"
        )
    per_round = [
        f"{two.calls_per_s / single.calls_per_s:.2f}"
        for single, two in zip(by_mode[1], by_mode[2], strict=True)
        if single.calls_per_s
    ]
    args = setup.args
    notes = [
        "",
        f"2 workers / 1 worker per round: {', '.join(per_round)}",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- machine: nproc {tools.nproc()}, {tools.cpu_model()}",
        f"- tools: {tools.h2load_version(setup.h2load_path)}, Python {sys.version.split()[0]}",
        f"- load: h2load -t 1 -c {args.clients} -m {args.streams}, {PAYLOAD} B unary; "
        f"{args.rounds} rounds of {args.duration:g} s per mode after {args.warmup:g} s "
        "warm-ups, order flipped every round",
        "- backends: 2 x loadtest/goecho; proxies with --log-level warning --access-log-sample 0",
        "- pinning: none: proxy workers, backends and h2load share all the cores",
    ]
    return "\n".join(lines + notes)


def _disturbed(run: Run) -> bool:
    return run.others is not None and run.others >= DISTURBED_CORES


def _mark(run: Run) -> str:
    if run.problems:
        return " (ERRORS)"
    if _disturbed(run):
        return f" (disturbed: {run.others:.2f} cores)"
    return ""


def _split(runs: Sequence[Run]) -> str:
    """The workers' CPU split of the mode's last clean run, largest first."""
    for run in reversed(runs):
        if len(run.worker_split) > 1:
            return "/".join(f"{s:.0%}" for s in sorted(run.worker_split, reverse=True))
    return "\u2013"


def run_all(setup: Setup, sup: procs.Supervisor, goecho: Path) -> list[Run]:
    args = setup.args
    backends = start_backends(sup, goecho, 2, None, args.startup_timeout)
    targets: dict[int, Target] = {}
    for workers in MODES:
        port = procs.free_port()
        admin = f"127.0.0.1:{procs.free_port()}"
        name = f"proxy-{workers}w"
        argv = proxy_argv(workers, f"127.0.0.1:{port}", admin, backends)
        target = launch(sup, name, argv, port, args.startup_timeout)
        failure = target.failure or wait_ready(admin, args.startup_timeout) or probe(setup, target)
        if failure is not None:
            raise SetupError(f"{name}: {failure} (log: {args.logs / (name + '.log')})")
        targets[workers] = target
    runs: list[Run] = []
    for round_ in range(args.rounds):
        order = MODES if round_ % 2 == 0 else tuple(reversed(MODES))
        for workers in order:
            run = measure(setup, targets[workers], backends, workers)
            for _ in range(args.retries):
                if not _disturbed(run):
                    break
                log(f"round {round_ + 1} workers={workers}: disturbed, measuring again")
                again = measure(setup, targets[workers], backends, workers)
                run = min(run, again, key=lambda r: r.others or 0.0)
            state = f" ERRORS: {'; '.join(run.problems)}" if run.problems else ""
            log(f"round {round_ + 1} workers={workers}: {run.calls_per_s:,.0f} calls/s{state}")
            runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    procs.exit_on_termination()
    try:
        h2load_path = tools.find("h2load")
        if h2load_path is None:
            raise SetupError("h2load not found (Debian: nghttp2-client; see .ci/install-tools.sh)")
        goecho = goecho_binary()
        with (
            tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp,
            procs.Supervisor(args.logs, tools.REPO) as sup,
        ):
            body = Path(tmp) / "body.bin"
            body.write_bytes(h2load.grpc_frame(PAYLOAD))
            setup = Setup(args, h2load_path, body)
            runs = run_all(setup, sup, goecho)
    except SetupError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    print(table(runs, setup))
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
