"""Two proxy modes measured in alternating rounds: what sticky_bench and workers_bench share.

Each of those scripts starts two loadtest/goecho backends and one proxy per mode, checks every
proxy with 8 serial calls, then sends the main benchmark's small unary call (one 16-byte gRPC
message per call to /echo.Echo/UnaryEcho, see loadtest/bench.py) through one proxy at a time
with h2load: the modes alternate and their order flips every round, so a drift of the machine
favours neither. The result is one Markdown table, a row per mode, and the ratio of the second
mode to the first. What tells the scripts apart (the proxies' flags, pinning, the CPU columns)
stays in each script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from loadtest import h2load, procs, tools
from loadtest.bench import Backends, Target, add_timing_args, launch
from loadtest.cpustat import CpuWindow, core_ticks, process_seconds
from loadtest.procs import SetupError, log

PAYLOAD = 16
PROBE_TIMEOUT_S = 10.0
NONE = "\u2013"  # en dash: no figure

M = TypeVar("M")  # what tells the modes apart: a name, a worker count
S = TypeVar("S", bound="Setup")


# --- command line ---------------------------------------------------------------------------


def add_round_args(parser: argparse.ArgumentParser) -> None:
    """--duration and --warmup (as loadtest.bench has them), then --rounds."""
    add_timing_args(parser)
    parser.add_argument(
        "--rounds", type=tools.positive_int, default=3, help="measured runs per mode"
    )


def add_setup_args(parser: argparse.ArgumentParser, startup_timeout: float, logs: str) -> None:
    """--startup-timeout, and --logs (default loadtest/out/LOGS)."""
    parser.add_argument("--startup-timeout", type=float, default=startup_timeout)
    parser.add_argument(
        "--logs",
        type=Path,
        default=tools.LOADTEST / "out" / logs,
        help="where the logs of the processes it starts go (default %(default)s)",
    )


def check_timing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.duration > 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")


# --- setup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What every run needs: the options, h2load, the request body and the load's shape."""

    args: argparse.Namespace
    h2load_path: str
    body: Path
    clients: int  # h2load -c
    streams: int  # h2load -m

    @property
    def load_cpu(self) -> int | None:
        """The core of the backends and h2load; None when nothing is pinned."""
        return None

    def load(self, duration_s: float) -> h2load.Load:
        return h2load.Load(self.clients, self.streams, duration_s=duration_s)

    def h2load_argv(self, target: Target, load: h2load.Load) -> list[str]:
        url = f"http://{target.address}{h2load.PATH}"
        return h2load.argv(self.h2load_path, url, self.body, load, None)


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


def start_proxy(
    setup: Setup,
    sup: procs.Supervisor,
    name: str,
    argv: list[str],
    port: int,
    what: str,
    ready: Callable[[], str | None] = lambda: None,
) -> Target:
    """Start one proxy and, once it listens and ``ready()`` says nothing against it, probe it;
    SetupError, with ``what`` and its log, when any of that fails."""
    args = setup.args
    target = launch(sup, name, argv, port, args.startup_timeout)
    failure = target.failure or ready() or probe(setup, target)
    if failure is not None:
        raise SetupError(f"{what}: {failure} (log: {args.logs / (name + '.log')})")
    return target


# --- runs -----------------------------------------------------------------------------------


@dataclass
class Run(Generic[M]):
    """One measured run of one mode; empty ``problems`` means clean."""

    mode: M
    calls_per_s: float
    proxy_cpu: float | None  # the proxy's processes, in cores
    load_core: float | None  # busy share of the load core (backends + h2load), when pinned
    machine_busy: float | None  # share of all cores busy, whatever ran
    others: float | None  # cores used by processes outside the benchmark: a disturbance
    split: list[float]  # each watched process's share of their CPU time
    problems: list[str]


def measure(
    setup: Setup, target: Target, backends: Backends, mode: M, split_pids: Sequence[int]
) -> Run[M]:
    """A warm-up, then one measured h2load run through ``target``, watching CPU use; ``split``
    is how the CPU time of ``split_pids`` fell between them."""
    args = setup.args
    if args.warmup > 0:
        warm = setup.load(args.warmup)
        procs.run(setup.h2load_argv(target, warm), warm.budget_s(), cwd=tools.REPO)
    load = setup.load(args.duration)
    window = CpuWindow(target.pids, backends.pids, setup.load_cpu)
    before = [process_seconds([pid]) for pid in split_pids]
    machine_before = core_ticks(None)
    window.start()
    done = procs.run(setup.h2load_argv(target, load), load.budget_s(), cwd=tools.REPO)
    window.stop()
    machine_after = core_ticks(None)
    used = [process_seconds([p]) - s for p, s in zip(split_pids, before, strict=True)]
    total = sum(used)
    split = [u / total for u in used] if total > 0 else []
    busy = None
    if machine_before and machine_after and machine_after[1] > machine_before[1]:
        busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
    rate, found = _outcome(setup, done)
    return Run(
        mode,
        rate,
        window.target_share,
        window.load_core_busy,
        busy,
        window.other_share,
        split,
        found,
    )


def _outcome(setup: Setup, done: procs.Completed) -> tuple[float, list[str]]:
    """The calls/s of a measured h2load run, and what went wrong in it."""
    if done.timed_out:
        return 0.0, ["h2load timed out"]
    try:
        report = h2load.parse(done.stdout)
    except ValueError:
        return 0.0, [f"h2load: {(done.stderr or done.stdout).strip()[-200:]}"]
    return report.req_per_s, h2load.problems(report, setup.body.stat().st_size)


def alternate(rounds: int, modes: Sequence[M]) -> Iterator[tuple[int, M]]:
    """(round, counted from 1; mode) in the order to measure: the order flips every round."""
    for round_ in range(rounds):
        order = modes if round_ % 2 == 0 else tuple(reversed(modes))
        for mode in order:
            yield round_ + 1, mode


def logged(run: Run[M], what: str) -> Run[M]:
    """``run``, once its calls/s (and errors) are said on stderr after ``what``."""
    state = f" ERRORS: {'; '.join(run.problems)}" if run.problems else ""
    log(f"{what}: {run.calls_per_s:,.0f} calls/s{state}")
    return run


def main(
    args: argparse.Namespace,
    prefix: str,
    make_setup: Callable[[str, Path], S],
    run_all: Callable[[S, procs.Supervisor, Path], list[Run[M]]],
    table: Callable[[Sequence[Run[M]], S], str],
) -> int:
    """A script's whole run: ``make_setup(h2load, body)``, ``run_all(setup, sup, goecho)``,
    then ``table(runs, setup)`` on stdout once every process is stopped. Exit status: 1 when
    some run had errors, else as :func:`procs.run_main` says."""

    def body() -> int:
        h2load_path = tools.find("h2load")
        if h2load_path is None:
            raise SetupError("h2load not found (Debian: nghttp2-client; see .ci/install-tools.sh)")
        goecho = goecho_binary()
        with (
            tempfile.TemporaryDirectory(prefix=prefix) as tmp,
            procs.Supervisor(args.logs, tools.REPO) as sup,
        ):
            request = Path(tmp) / "body.bin"
            request.write_bytes(h2load.grpc_frame(PAYLOAD))
            setup = make_setup(h2load_path, request)
            runs = run_all(setup, sup, goecho)
        print(table(runs, setup))
        return 1 if any(r.problems for r in runs) else 0

    return procs.run_main(body)


# --- the table ------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are there; None when none is."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def pct(value: float | None) -> str:
    return NONE if value is None else f"{value:.0%}"


def cores(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def split_text(runs: Sequence[Run[M]]) -> str:
    """The CPU split of the mode's last run that has one between several processes, largest
    first."""
    for run in reversed(runs):
        if len(run.split) > 1:
            return "/".join(f"{s:.0%}" for s in sorted(run.split, reverse=True))
    return NONE


def table(
    setup: Setup,
    runs: Sequence[Run[M]],
    modes: Sequence[M],
    columns: tuple[str, str],
    figures: Callable[[Sequence[Run[M]]], str],
    mark: Callable[[Run[M]], str],
    ratio: str,
    load: str,
    notes: Sequence[str],
) -> str:
    """The Markdown table, a row per mode: the mode, its median calls/s, its rounds (each
    followed by ``mark(run)``), ``figures(mode_runs)`` (the script's own cells) and the ratio of
    its median to the first mode's. ``columns`` are the header and alignment lines. Below it,
    ``ratio`` (e.g. "sticky / plain") round by round, then the date, the machine, the tools, the
    load (``load`` says more about it) and ``notes``."""
    by_mode = {m: [r for r in runs if r.mode == m] for m in modes}
    medians = {m: statistics.median(r.calls_per_s for r in rs) for m, rs in by_mode.items()}
    first, second = modes[0], modes[1]
    base = medians[first]
    lines = list(columns)
    for mode, mode_runs in by_mode.items():
        rounds = ", ".join(f"{r.calls_per_s:,.0f}{mark(r)}" for r in mode_runs)
        vs = "1.00" if mode == first else (f"{medians[mode] / base:.2f}" if base else "?")
        lines.append(f"| {mode} | {medians[mode]:,.0f} | {rounds} | {figures(mode_runs)} | {vs} |")
    per_round = [
        f"{b.calls_per_s / a.calls_per_s:.2f}"
        for a, b in zip(by_mode[first], by_mode[second], strict=True)
        if a.calls_per_s
    ]
    args = setup.args
    lines += [
        "",
        f"{ratio} per round: {', '.join(per_round)}",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- machine: nproc {tools.nproc()}, {tools.cpu_model()}",
        f"- tools: {tools.h2load_version(setup.h2load_path)}, Python {sys.version.split()[0]}",
        f"- load: h2load -t 1 -c {setup.clients} -m {setup.streams}, {PAYLOAD} B unary{load}; "
        f"{args.rounds} rounds of {args.duration:g} s per mode after {args.warmup:g} s "
        "warm-ups, order flipped every round",
        *notes,
    ]
    return "\n".join(lines)
