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
import datetime as dt
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import h2load, procs, tools
from loadtest.bench import (
    Backends,
    Pinning,
    SetupError,
    Target,
    choose_pinning,
    launch,
    log,
    start_backends,
)
from loadtest.cpustat import CpuWindow, process_seconds

STICKY_HEADER = "x-key"
PAYLOAD = 16
CLIENTS = 8
STREAMS = 16
MODES = ("plain", "sticky")
PROBE_TIMEOUT_S = 10.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sticky_bench",
        description="calls/s through the proxy with --sticky-header on vs off, one table.",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per mode")
    parser.add_argument(
        "--key", default="abc", help=f"the {STICKY_HEADER} value every call carries"
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxies")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for backends and h2load")
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    parser.add_argument(
        "--logs",
        type=Path,
        default=tools.LOADTEST / "out" / "sticky-logs",
        help="where the logs of the processes it starts go (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.duration > 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    return args


@dataclass(frozen=True)
class Setup:
    args: argparse.Namespace
    h2load_path: str
    pinning: Pinning
    body: Path

    @property
    def header(self) -> str:
        return f"{STICKY_HEADER}: {self.args.key}"

    def h2load_argv(self, target: Target, load: h2load.Load) -> list[str]:
        url = f"http://{target.address}{h2load.PATH}"
        argv = h2load.argv(self.h2load_path, url, self.body, load, None)
        # h2load.argv ends with the URL; the sticky header goes with the others, before it.
        return procs.pinned([*argv[:-1], "-H", self.header, argv[-1]], self.pinning.load_cpu)


def goecho_binary() -> Path:
    """loadtest/bin/goecho, built as loadtest/tools.py builds it when it is not there yet."""
    binary = tools.BIN_DIR / "goecho"
    if binary.is_file():
        return binary
    go = tools.find("go")
    if go is None:
        raise SetupError("loadtest/bin/goecho is missing and go was not found to build it")
    log("building loadtest/goecho ...")
    try:
        return tools.build_goecho(go)
    except RuntimeError as exc:
        raise SetupError(str(exc)) from exc


def proxy_argv(setup: Setup, mode: str, listen: str, backends: Backends) -> list[str]:
    argv = [sys.executable, "-m", "proxy", "serve", "--listen", listen, "--log-level", "warning"]
    for address in backends.addresses:
        argv += ["--backend", address]
    if mode == "sticky":
        argv += ["--sticky-header", STICKY_HEADER]
    return procs.pinned(argv, setup.pinning.proxy_cpu)


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
    mode: str
    calls_per_s: float
    proxy_cpu: float | None
    load_core: float | None  # busy share of the load core (backends + h2load)
    backend_split: list[float]  # each backend's share of the backends' CPU time
    problems: list[str] = field(default_factory=list)


def measure(setup: Setup, target: Target, backends: Backends, mode: str) -> Run:
    args = setup.args
    if args.warmup > 0:
        load = h2load.Load(CLIENTS, STREAMS, duration_s=args.warmup)
        procs.run(setup.h2load_argv(target, load), load.budget_s(), cwd=tools.REPO)
    load = h2load.Load(CLIENTS, STREAMS, duration_s=args.duration)
    window = CpuWindow(target.pids, backends.pids, setup.pinning.load_cpu)
    before = [process_seconds([pid]) for pid in backends.pids]
    window.start()
    done = procs.run(setup.h2load_argv(target, load), load.budget_s(), cwd=tools.REPO)
    window.stop()
    used = [process_seconds([p]) - s for p, s in zip(backends.pids, before, strict=True)]
    total = sum(used)
    split = [u / total for u in used] if total > 0 else []
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
    return Run(mode, rate, window.target_share, window.load_core_busy, split, found)


def _pct(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.0%}"


def table(runs: Sequence[Run], setup: Setup) -> str:
    by_mode = {m: [r for r in runs if r.mode == m] for m in MODES}
    medians = {m: statistics.median(r.calls_per_s for r in rs) for m, rs in by_mode.items()}
    plain = medians["plain"]
    lines = [
        "| mode | calls/s (median) | rounds | proxy CPU | load core | backend CPU split "
        "| sticky / plain |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for mode, mode_runs in by_mode.items():
        rounds = ", ".join(
            f"{r.calls_per_s:,.0f}" + (" (ERRORS)" if r.problems else "") for r in mode_runs
        )
        cpu = [r.proxy_cpu for r in mode_runs if r.proxy_cpu is not None]
        load = [r.load_core for r in mode_runs if r.load_core is not None]
        split = _split(mode_runs)
        ratio = "1.00" if mode == "plain" else (f"{medians[mode] / plain:.2f}" if plain else "?")
        lines.append(
            f"| {mode} | {medians[mode]:,.0f} | {rounds} | "
            f"{_pct(statistics.median(cpu) if cpu else None)} | "
            f"{_pct(statistics.median(load) if load else None)} | {split} | {ratio} |"
        )
    per_round = [
        f"{s.calls_per_s / p.calls_per_s:.2f}"
        for p, s in zip(by_mode["plain"], by_mode["sticky"], strict=True)
        if p.calls_per_s
    ]
    args = setup.args
    notes = [
        "",
        f"sticky / plain per round: {', '.join(per_round)}",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- machine: nproc {tools.nproc()}, {tools.cpu_model()}",
        f"- tools: {tools.h2load_version(setup.h2load_path)}, Python {sys.version.split()[0]}",
        f"- load: h2load -t 1 -c {CLIENTS} -m {STREAMS}, {PAYLOAD} B unary, "
        f"header `{setup.header}` on every call (both modes); {args.rounds} rounds of "
        f"{args.duration:g} s per mode after {args.warmup:g} s warm-ups, order flipped "
        "every round",
        "- backends: 2 x loadtest/goecho; sticky = `--sticky-header "
        f"{STICKY_HEADER}`, plain = round robin",
        f"- pinning: {_pinning(setup.pinning)}",
    ]
    return "\n".join(lines + notes)


def _pinning(pinning: Pinning) -> str:
    if pinning.proxy_cpu is None:
        return "none (taskset missing or fewer than 2 usable cores): everything shares cores"
    return f"proxies on cpu {pinning.proxy_cpu}; backends and h2load -t 1 on cpu {pinning.load_cpu}"


def _split(runs: Sequence[Run]) -> str:
    """The backends' CPU split of the mode's last clean run, largest first."""
    for run in reversed(runs):
        if run.backend_split:
            return "/".join(f"{s:.0%}" for s in sorted(run.backend_split, reverse=True))
    return "\u2013"


def run_all(setup: Setup, sup: procs.Supervisor, goecho: Path) -> list[Run]:
    args = setup.args
    backends = start_backends(sup, goecho, 2, setup.pinning.load_cpu, args.startup_timeout)
    targets: dict[str, Target] = {}
    for mode in MODES:
        port = procs.free_port()
        listen = f"127.0.0.1:{port}"
        target = launch(
            sup, mode, proxy_argv(setup, mode, listen, backends), port, args.startup_timeout
        )
        failure = target.failure or probe(setup, target)
        if failure is not None:
            raise SetupError(f"{mode} proxy: {failure} (log: {args.logs / (mode + '.log')})")
        targets[mode] = target
    runs: list[Run] = []
    for round_ in range(args.rounds):
        order = MODES if round_ % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            run = measure(setup, targets[mode], backends, mode)
            state = f" ERRORS: {'; '.join(run.problems)}" if run.problems else ""
            log(f"round {round_ + 1} {mode}: {run.calls_per_s:,.0f} calls/s{state}")
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
        pinning = choose_pinning(args)
        with (
            tempfile.TemporaryDirectory(prefix="sticky-bench-") as tmp,
            procs.Supervisor(args.logs, tools.REPO) as sup,
        ):
            body = Path(tmp) / "body.bin"
            body.write_bytes(h2load.grpc_frame(PAYLOAD))
            setup = Setup(args, h2load_path, pinning, body)
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
