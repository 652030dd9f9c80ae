"""Data-plane benchmark: direct to the backends, our proxy and HAProxy, side by side.

Run from the repository root::

    python -m loadtest.bench                      # everything, about 1.5 minutes
    python -m loadtest.bench --only direct,haproxy --duration 3
    python -m loadtest.bench --scenarios small,tls   # h2c small calls and the TLS scenarios

See loadtest/README.md for the scenarios and the caveats. This is a benchmark, not a test: it
never judges speed, but it exits 1 when a reference (direct or HAProxy) produced no clean result,
and 2 when it could not set up at all (a missing tool, a failed build, a backend that won't start).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest import certs, ghz, h2load, procs, report, tools
from loadtest.cpustat import CpuWindow
from loadtest.procs import SetupError, log
from loadtest.report import NOT_AVAILABLE, SKIPPED, Row, Scenario
from loadtest.stats import Measurement

TARGETS = ("direct", "haproxy", "proxy", "proxy-pure")
# proxy-pure: the same proxy with GRPC_ETCD_PROXY_PURE=1 (its pure-Python modules, not the
# compiled ones), the "before" of the compiled data path in the same run; asked for by name.
DEFAULT_TARGETS = ("direct", "haproxy", "proxy")
REFERENCES = ("direct", "haproxy")
H2C_SCENARIOS = ("small", "large", "serial", "ghz")
TLS_SCENARIOS = ("tls-small", "tls-large", "tls-handshake")
SCENARIO_KEYS = (*H2C_SCENARIOS, *TLS_SCENARIOS)
# Names that stand for several scenarios in --scenarios.
SCENARIO_GROUPS = {"h2c": H2C_SCENARIOS, "tls": TLS_SCENARIOS}
PROTO = tools.REPO / "protos" / "echo.proto"
# No access log: a log line per call would measure the logger, not the relay (it is on by default).
DEFAULT_PROXY_CMD = (
    "{python} -m proxy serve --listen {listen} {backend_args} --admin 127.0.0.1:0 "
    "--access-log-sample 0"
)
# The same with TLS on both legs: the listener's certificate, the backends' verified against the
# run's CA under the name both proxies check (HAProxy: `sni` and `verifyhost`).
DEFAULT_PROXY_TLS_CMD = (
    "{python} -m proxy serve --listen tls:{listen} --tls-cert {tls_cert} --tls-key {tls_key} "
    "{backend_args} --backend-tls --backend-ca {ca} --backend-server-name {server_name} "
    "--admin 127.0.0.1:0 --access-log-sample 0"
)
SMALL = 16
LARGE = 1 << 20
# New TLS connections per h2load run in the handshake scenario: all opened at once, each makes
# one call. Under every listener's accept backlog (the proxy 1024, HAProxy maxconn, Go
# somaxconn), so that no SYN waits for a retransmit.
HANDSHAKE_BATCH = 100
GHZ_MIN_WARMUP_S = 0.5
PROBE_TIMEOUT_S = 10.0


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    every = [
        Scenario(
            key="small",
            title="small unary 16 B, c=8 m=16",
            tool="h2load",
            payload_size=SMALL,
            clients=8,
            streams=16,
            latency_ratio=False,
            count_share=1.0,
        ),
        Scenario(
            key="large",
            title="1 MiB unary, c=4 m=2",
            tool="h2load",
            payload_size=LARGE,
            clients=4,
            streams=2,
            latency_ratio=False,
            count_share=0.01,
        ),
        Scenario(
            key="serial",
            title="serial 16 B, c=1 m=1",
            tool="h2load",
            payload_size=SMALL,
            clients=1,
            streams=1,
            latency_ratio=True,
            count_share=0.1,
            request_log=True,
        ),
        Scenario(
            key="ghz",
            title=f"ghz unary 16 B, c={args.ghz_concurrency}",
            tool="ghz",
            payload_size=SMALL,
            clients=args.ghz_concurrency,
            streams=1,
            latency_ratio=False,
            count_share=0.25,
        ),
    ]
    # The TLS twins of small and large: the same load, TLS on both legs.
    by_key = {s.key: s for s in every}
    every += [
        replace(
            by_key[twin],
            key=f"tls-{twin}",
            title=f"TLS {by_key[twin].title}",
            tls=True,
            h2c_twin=twin,
        )
        for twin in ("small", "large")
    ]
    every.append(
        Scenario(
            key="tls-handshake",
            title=f"TLS new connection per call, {HANDSHAKE_BATCH} at a time",
            tool="h2load",
            payload_size=SMALL,
            clients=HANDSHAKE_BATCH,
            streams=1,
            latency_ratio=False,
            count_share=0.02,
            tls=True,
            new_connections=True,
        )
    )
    return [s for s in every if s.key in args.scenarios]


def _names(
    allowed: Sequence[str], groups: dict[str, tuple[str, ...]] | None = None
) -> Callable[[str], list[str]]:
    groups = groups or {}

    def parse(text: str) -> list[str]:
        names: list[str] = []
        for name in (n.strip() for n in text.split(",")):
            names += groups.get(name, (name,) if name else ())
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            choices = ",".join([*allowed, *groups])
            raise argparse.ArgumentTypeError(f"choose from {choices}")
        return names

    return parse


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """--duration and --warmup: how long each measured run and its warm-up last."""
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="Direct vs our proxy vs HAProxy, h2load and ghz, one table.",
    )
    add_timing_args(parser)
    parser.add_argument(
        "-n",
        "--requests",
        type=int,
        default=None,
        help="fixed call counts instead of --duration: N calls in the small scenarios, "
        "N/4 with ghz, N/10 serial, N/100 of 1 MiB, N/50 new TLS connections",
    )
    parser.add_argument(
        "--only",
        type=_names(TARGETS),
        default=list(DEFAULT_TARGETS),
        help=f"comma-separated targets out of {','.join(TARGETS)} "
        f"(default: {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--scenarios",
        type=_names(SCENARIO_KEYS, SCENARIO_GROUPS),
        default=list(H2C_SCENARIOS),
        help=f"comma-separated scenarios out of {','.join(SCENARIO_KEYS)}, or the groups "
        f"h2c and tls (default: {','.join(H2C_SCENARIOS)})",
    )
    parser.add_argument("--backends", type=int, default=2, help="number of goecho backends")
    parser.add_argument(
        "--proxy-cmd",
        default=DEFAULT_PROXY_CMD,
        help="how to start our proxy; placeholders {python} {listen} {port} {backend_args} "
        f"{{backends}} (comma-separated). Default: {DEFAULT_PROXY_CMD!r}",
    )
    parser.add_argument(
        "--proxy-tls-cmd",
        default=DEFAULT_PROXY_TLS_CMD,
        help="how to start our proxy for the TLS scenarios; the placeholders of --proxy-cmd, "
        "and {tls_cert} {tls_key} (the listener's), {ca} (signs the backends' certificate), "
        f"{{server_name}} (in it). Default: {DEFAULT_PROXY_TLS_CMD!r}",
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core for HAProxy / our proxy")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for backends and load")
    parser.add_argument("--ghz-concurrency", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=tools.LOADTEST / "out")
    args = parser.parse_args(argv)
    if args.backends < 1:
        parser.error("--backends must be at least 1")
    return args


# --- setup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    h2load: str
    haproxy: str | None
    ghz: str | None
    go: str | None
    goecho: Path


def find_tools(args: argparse.Namespace) -> Tools:
    h2load_path = tools.find("h2load")
    haproxy_path = tools.find("haproxy")
    go = tools.find("go")
    if h2load_path is None:
        raise SetupError("h2load not found (Debian: nghttp2-client; see .ci/install-tools.sh)")
    if "haproxy" in args.only and haproxy_path is None:
        raise SetupError("haproxy not found (Debian: haproxy; see .ci/install-tools.sh)")
    if go is None:
        raise SetupError("go not found: it is needed to build loadtest/goecho")
    log("building loadtest/goecho ...")
    try:
        goecho = tools.build_goecho(go)
    except RuntimeError as exc:
        raise SetupError(str(exc)) from exc
    return Tools(h2load_path, haproxy_path, tools.find("ghz"), go, goecho)


@dataclass(frozen=True)
class Pinning:
    proxy_cpu: int | None
    load_cpu: int | None

    def describe(self) -> str:
        if self.proxy_cpu is None:
            return "none (taskset missing or fewer than 2 usable cores): everything shares cores"
        return (
            f"HAProxy / our proxy on cpu {self.proxy_cpu}; backends and load generators "
            f"(h2load -t 1, ghz) on cpu {self.load_cpu}"
        )


def choose_pinning(args: argparse.Namespace) -> Pinning:
    usable = tools.find("taskset") is not None and args.proxy_cpu != args.load_cpu
    cores = set(os.sched_getaffinity(0))
    if usable and {args.proxy_cpu, args.load_cpu} <= cores:
        return Pinning(args.proxy_cpu, args.load_cpu)
    log("warning: not pinning to cores: " + Pinning(None, None).describe())
    return Pinning(None, None)


@dataclass
class Backends:
    addresses: list[str]
    pids: list[int]
    tls: bool = False
    logs: list[Path] = field(default_factory=list)


def start_backends(
    sup: procs.Supervisor,
    goecho: Path,
    count: int,
    cpu: int | None,
    timeout_s: float,
    tls: certs.BenchCerts | None = None,
) -> Backends:
    """``count`` goecho backends, serving TLS with the backends' certificate when ``tls``."""
    backends = Backends([], [], tls=tls is not None)
    prefix = "goecho-tls" if tls else "goecho"
    for index in range(count):
        port = procs.free_port()
        address = f"127.0.0.1:{port}"
        argv = [str(goecho), "-addr", address]
        if tls is not None:
            argv += ["-tls-cert", str(tls.backend_cert), "-tls-key", str(tls.backend_key)]
        service = sup.start(f"{prefix}-{index}", procs.pinned(argv, cpu))
        failure = procs.wait_for_port(service, port, timeout_s)
        if failure is not None:
            raise SetupError(f"{failure}\n{service.log_tail()}")
        backends.addresses.append(address)
        backends.pids.append(service.proc.pid)
        backends.logs.append(service.log_path)
    log(f"{'TLS ' if tls else ''}backends: {', '.join(backends.addresses)}")
    return backends


def backend_handshakes(backends: Backends) -> list[str]:
    """What the TLS backends' handshakes negotiated, each kind once (goecho logs them)."""
    marker = "tls handshake: "
    kinds: set[str] = set()
    for path in backends.logs:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        kinds.update(line.split(marker, 1)[1] for line in lines if marker in line)
    return sorted(kinds)


# --- targets --------------------------------------------------------------------------------


@dataclass
class Target:
    """Something to send load to: its address, the processes that serve it, or why it can't."""

    name: str
    address: str = ""
    pids: list[int] = field(default_factory=list)
    backend_pids: list[int] = field(default_factory=list)
    failure: str | None = None
    service: procs.Service | None = None
    tls: bool = False  # listens with TLS (and speaks TLS to its backends)

    @property
    def url(self) -> str:
        return h2load.url(self.address, self.tls)


HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096
{tls_global}
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s

frontend grpc_in
    bind {listen} {bind_options}
    default_backend echo

backend echo
    balance roundrobin
    http-reuse always
{servers}
"""


# TLS 1.3 with one suite on both sides, as h2load offers and goecho serves (see loadtest.h2load).
HAPROXY_TLS_GLOBAL = f"""\
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-bind-ciphersuites {h2load.TLS13_CIPHER}
    ssl-default-server-options ssl-min-ver TLSv1.3
    ssl-default-server-ciphersuites {h2load.TLS13_CIPHER}
"""


def haproxy_config(
    listen: str, backends: Sequence[str], tls: certs.BenchCerts | None = None
) -> str:
    """h2c on both sides, or with ``tls`` TLS on both: the listener's certificate on the bind
    line, the backends' verified against the CA under the name our proxy checks too."""
    if tls is None:
        tls_global, bind_options, server_options = "", "proto h2", "proto h2"
    else:
        tls_global = HAPROXY_TLS_GLOBAL
        bind_options = f"ssl crt {tls.listener_pem} alpn h2"
        name = certs.SERVER_NAME
        server_options = (
            f"ssl verify required ca-file {tls.ca} sni str({name}) verifyhost {name} alpn h2"
        )
    servers = "\n".join(f"    server b{i} {a} {server_options}" for i, a in enumerate(backends))
    return HAPROXY_CONFIG.format(
        listen=listen, tls_global=tls_global, bind_options=bind_options, servers=servers
    )


def proxy_argv(
    template: str, listen: str, backends: Sequence[str], tls: certs.BenchCerts | None = None
) -> list[str]:
    fields = {
        "python": shlex.quote(sys.executable),
        "listen": listen,
        "port": listen.rsplit(":", 1)[1],
        "backend_args": " ".join(f"--backend {b}" for b in backends),
        "backends": ",".join(backends),
    }
    if tls is not None:
        fields |= {
            "tls_cert": shlex.quote(str(tls.listener_cert)),
            "tls_key": shlex.quote(str(tls.listener_key)),
            "ca": shlex.quote(str(tls.ca)),
            "server_name": certs.SERVER_NAME,
        }
    return shlex.split(template.format(**fields))


def launch(
    sup: procs.Supervisor,
    name: str,
    argv: list[str],
    port: int,
    timeout_s: float,
    tls: bool = False,
) -> Target:
    """Start a target; its log is ``<name>.log``, or ``<name>-tls.log`` for a TLS one."""
    service = sup.start(f"{name}-tls" if tls else name, argv)
    target = Target(name, f"127.0.0.1:{port}", [service.proc.pid], service=service, tls=tls)
    failure = procs.wait_for_port(service, port, timeout_s)
    if failure is not None:
        tail = service.log_tail(3).replace("\n", " / ")
        target.failure = failure + (f" ({tail})" if tail else "")
    return target


def _log_hint(target: Target) -> str:
    if target.service is None:
        return ""
    path = target.service.log_path
    return f"; log: {path.relative_to(tools.REPO) if path.is_relative_to(tools.REPO) else path}"


def start_target(
    name: str, ctx: Context, sup: procs.Supervisor, backends: Backends, workdir: Path
) -> Target:
    """The target in front of ``backends``: with TLS on both legs when they are TLS ones."""
    tls = ctx.certs if backends.tls else None
    if name == "direct":
        pids = list(backends.pids)
        return Target(name, backends.addresses[0], pids, list(pids), tls=backends.tls)
    port = procs.free_port()
    listen = f"127.0.0.1:{port}"
    if name == "haproxy":
        assert ctx.tools.haproxy is not None
        config = workdir / ("haproxy-tls.cfg" if tls else "haproxy.cfg")
        config.write_text(haproxy_config(listen, backends.addresses, tls))
        argv = [ctx.tools.haproxy, "-db", "-f", str(config)]
    else:
        flag, template = (
            ("--proxy-tls-cmd", ctx.args.proxy_tls_cmd)
            if tls
            else ("--proxy-cmd", ctx.args.proxy_cmd)
        )
        try:
            argv = proxy_argv(template, listen, backends.addresses, tls)
        except (KeyError, IndexError, ValueError) as exc:
            return Target(name, failure=f"bad {flag}: {exc}", tls=backends.tls)
        if name == "proxy-pure":
            argv = ["env", "GRPC_ETCD_PROXY_PURE=1", *argv]
    argv = procs.pinned(argv, ctx.pinning.proxy_cpu)
    target = launch(sup, name, argv, port, ctx.args.startup_timeout, tls=backends.tls)
    target.backend_pids = list(backends.pids)
    return target


# --- runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    args: argparse.Namespace
    tools: Tools
    pinning: Pinning
    workdir: Path
    certs: certs.BenchCerts | None = None  # made when a TLS scenario runs

    def body(self, payload_size: int) -> Path:
        path = self.workdir / f"body-{payload_size}.bin"
        if not path.exists():
            path.write_bytes(h2load.grpc_frame(payload_size))
        return path


def probe(ctx: Context, target: Target) -> str | None:
    """A few serial echo calls through the target; None if all came back whole."""
    load = h2load.Load(clients=1, streams=1, requests=8)
    body = ctx.body(SMALL)
    argv = h2load.argv(ctx.tools.h2load, target.url, body, load, None)
    done = procs.run(procs.pinned(argv, ctx.pinning.load_cpu), timeout_s=PROBE_TIMEOUT_S)
    if done.timed_out:
        return "probe calls timed out"
    try:
        found = h2load.problems(h2load.parse(done.stdout), body.stat().st_size)
    except ValueError:
        return f"probe failed: {(done.stderr or done.stdout).strip()[-200:]}"
    return f"probe: {'; '.join(found)}" if found else None


def _load_for(ctx: Context, scenario: Scenario, warmup: bool) -> tuple[float | None, int | None]:
    """(duration, requests) for a run: timed by default, counted with -n."""
    args = ctx.args
    if args.requests is None:
        return (args.warmup if warmup else args.duration), None
    count = max(scenario.clients * scenario.streams, int(args.requests * scenario.count_share))
    warmup_count = max(scenario.clients * scenario.streams, count // 10)
    return None, (warmup_count if warmup else count)


def _measured(
    target: Target, ctx: Context, argv: list[str], budget_s: float
) -> tuple[procs.Completed, CpuWindow]:
    """Run a load generator while watching the CPU use of the target and of the load core."""
    window = CpuWindow(target.pids, target.backend_pids, ctx.pinning.load_cpu)
    window.start()
    done = procs.run(procs.pinned(argv, ctx.pinning.load_cpu), budget_s, cwd=tools.REPO)
    window.stop()
    return done, window


def _h2load_once(
    ctx: Context, target: Target, scenario: Scenario, warmup: bool
) -> tuple[procs.Completed, CpuWindow, Path | None]:
    duration, requests = _load_for(ctx, scenario, warmup)
    load = h2load.Load(scenario.clients, scenario.streams, duration, requests)
    log_file = None
    if scenario.request_log and not warmup:
        log_file = ctx.workdir / "h2load-requests.log"
    argv = h2load.argv(
        ctx.tools.h2load, target.url, ctx.body(scenario.payload_size), load, log_file
    )
    done, window = _measured(target, ctx, argv, load.budget_s())
    return done, window, log_file


def run_h2load(ctx: Context, target: Target, scenario: Scenario) -> Row:
    if ctx.args.requests is not None or ctx.args.warmup > 0:
        warmup, _, _ = _h2load_once(ctx, target, scenario, warmup=True)
        if warmup.timed_out:
            return Row(scenario, target.name, NOT_AVAILABLE, "warm-up timed out", argv=warmup.argv)
    done, window, log_file = _h2load_once(ctx, target, scenario, warmup=False)
    if done.timed_out:
        return Row(scenario, target.name, NOT_AVAILABLE, "h2load timed out", argv=done.argv)
    try:
        parsed = h2load.parse(done.stdout)
    except ValueError:
        note = f"h2load: {(done.stderr or done.stdout).strip()[-200:]}"
        return Row(scenario, target.name, NOT_AVAILABLE, note, argv=done.argv)
    response_size = ctx.body(scenario.payload_size).stat().st_size
    measurement = h2load.measurement(parsed, log_file, response_size)
    if log_file is not None:
        log_file.unlink(missing_ok=True)
    return _row(scenario, target, measurement, done.argv, window)


def _handshake_runs(
    ctx: Context, target: Target, scenario: Scenario, warmup: bool
) -> tuple[list[procs.Completed], CpuWindow]:
    """h2load runs of ``scenario.clients`` new connections with one call each, one run after
    the other, for the run's duration (at least one) or until the run's count is reached.

    h2load reuses no TLS session between runs (each is a new process) nor within one (all its
    connections start before any handshake ends), so every handshake is a full one.
    """
    duration, requests = _load_for(ctx, scenario, warmup)
    batch = h2load.Load(scenario.clients, 1, requests=scenario.clients)
    argv = procs.pinned(
        h2load.argv(ctx.tools.h2load, target.url, ctx.body(SMALL), batch, None),
        ctx.pinning.load_cpu,
    )
    batches = -(-requests // scenario.clients) if requests is not None else None
    window = CpuWindow(target.pids, target.backend_pids, ctx.pinning.load_cpu)
    runs: list[procs.Completed] = []
    window.start()
    deadline = time.monotonic() + (duration or 0.0)
    while True:
        done = procs.run(argv, batch.budget_s(), cwd=tools.REPO)
        runs.append(done)
        if done.timed_out or done.returncode != 0:
            break
        if (len(runs) >= batches) if batches is not None else (time.monotonic() >= deadline):
            break
    window.stop()
    return runs, window


def run_handshakes(ctx: Context, target: Target, scenario: Scenario) -> Row:
    if ctx.args.requests is not None or ctx.args.warmup > 0:
        warmup, _ = _handshake_runs(ctx, target, scenario, warmup=True)
        if warmup[-1].timed_out:
            return Row(
                scenario, target.name, NOT_AVAILABLE, "warm-up timed out", argv=warmup[-1].argv
            )
    runs, window = _handshake_runs(ctx, target, scenario, warmup=False)
    last = runs[-1]
    if last.timed_out:
        return Row(scenario, target.name, NOT_AVAILABLE, "h2load timed out", argv=last.argv)
    try:
        combined = h2load.combine([h2load.parse(run.stdout) for run in runs])
    except ValueError:
        note = f"h2load: {(last.stderr or last.stdout).strip()[-200:]}"
        return Row(scenario, target.name, NOT_AVAILABLE, note, argv=last.argv)
    measurement = h2load.measurement(combined, None, ctx.body(SMALL).stat().st_size)
    # A connection's time mostly measures its place in the queue of its run's handshakes.
    measurement.mean_us = None
    row = _row(scenario, target, measurement, last.argv, window)
    # The target's CPU over the h2load runs' own time, as calls/s is: between two runs, while
    # the next h2load starts, the target has nothing to do.
    busy_s = combined.elapsed_us / 1e6
    if window.target_seconds is not None and busy_s > 0:
        row.target_cpu = window.target_seconds / busy_s
    return row


def _row(
    scenario: Scenario, target: Target, m: Measurement, argv: list[str], window: CpuWindow
) -> Row:
    row = report.from_measurement(scenario, target.name, m, argv)
    row.target_cpu = window.target_share
    row.load_cpu = window.load_core_busy
    row.other_cpu = window.other_share
    return row


def _ghz_argv(ctx: Context, target: Target, scenario: Scenario, load: ghz.Load) -> list[str]:
    assert ctx.tools.ghz is not None
    return ghz.argv(ctx.tools.ghz, PROTO, target.address, scenario.payload_size, load)


def _ghz_main_load(ctx: Context, scenario: Scenario, warmup: procs.Completed) -> ghz.Load:
    """A call count for the measured ghz run. In timed mode it comes from the warm-up's rate:
    ghz's own -z cuts the calls in flight at the end, and it reports them as errors."""
    _, requests = _load_for(ctx, scenario, warmup=False)
    if requests is None:
        try:
            rate = ghz.measurement(warmup.stdout).calls_per_s
        except ValueError:
            rate = 0.0
        if rate <= 0:
            return ghz.Load(scenario.clients, duration_s=ctx.args.duration)
        requests = max(scenario.clients, int(rate * ctx.args.duration))
    return ghz.Load(scenario.clients, requests=requests)


def run_ghz(ctx: Context, target: Target, scenario: Scenario) -> Row:
    if ctx.tools.ghz is None:
        return Row(scenario, target.name, SKIPPED, "ghz not found")
    if not PROTO.exists():
        return Row(scenario, target.name, SKIPPED, f"{PROTO} not found")
    duration, requests = _load_for(ctx, scenario, warmup=True)
    if duration is not None:  # the warm-up also measures the rate: give it some time
        duration = max(duration, GHZ_MIN_WARMUP_S)
    warmup_load = ghz.Load(scenario.clients, duration, requests)
    warmup = procs.run(
        procs.pinned(_ghz_argv(ctx, target, scenario, warmup_load), ctx.pinning.load_cpu),
        warmup_load.budget_s(),
        cwd=tools.REPO,
    )
    load = _ghz_main_load(ctx, scenario, warmup)
    done, window = _measured(target, ctx, _ghz_argv(ctx, target, scenario, load), load.budget_s())
    if done.timed_out:
        return Row(scenario, target.name, NOT_AVAILABLE, "ghz timed out", argv=done.argv)
    try:
        measurement = ghz.measurement(done.stdout)
    except ValueError:
        note = f"ghz: {(done.stderr or done.stdout).strip()[-200:]}"
        return Row(scenario, target.name, NOT_AVAILABLE, note, argv=done.argv)
    return _row(scenario, target, measurement, done.argv, window)


def _exited(target: Target) -> str | None:
    if target.service is None or target.service.proc.poll() is None:
        return None
    return f"{target.name} exited with status {target.service.proc.returncode}"


def bench_target(ctx: Context, target: Target, chosen: Sequence[Scenario]) -> list[Row]:
    failure = target.failure or probe(ctx, target)
    rows: list[Row] = []
    for scenario in chosen:
        failure = failure or _exited(target)
        if failure is not None:
            rows.append(Row(scenario, target.name, NOT_AVAILABLE, failure + _log_hint(target)))
            continue
        log(f"[{target.name}] {scenario.title} ...")
        run = run_ghz if scenario.tool == "ghz" else run_h2load
        if scenario.new_connections:
            run = run_handshakes
        row = run(ctx, target, scenario)
        m = row.measurement
        rate = f"{m.calls_per_s:,.0f} calls/s" if m else ""
        log(f"[{target.name}] {scenario.title}: {rate} {row.status} {row.note}".rstrip())
        rows.append(row)
    if failure is not None:
        log(f"[{target.name}] n/a: {failure}{_log_hint(target)}")
    return rows


# --- the whole run --------------------------------------------------------------------------


def metadata(ctx: Context, backends: int, handshakes: Sequence[str]) -> dict[str, Any]:
    t = ctx.tools
    args = ctx.args
    if args.requests is None:
        runs = f"{args.duration:g} s each after a {args.warmup:g} s warm-up"
    else:
        runs = f"fixed counts from -n {args.requests}, each after a warm-up of a tenth of that"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"nproc {tools.nproc()}, {tools.cpu_model()}",
        "tools": ", ".join(
            [
                tools.haproxy_version(t.haproxy) if t.haproxy else "HAProxy (not found)",
                tools.h2load_version(t.h2load),
                tools.ghz_version(t.ghz, t.go) if t.ghz else "ghz (not found)",
                f"Python {sys.version.split()[0]}",
            ]
        ),
        "backends": f"{backends} x loadtest/goecho (grpc-go "
        f"{tools.go_module_version('google.golang.org/grpc')}, raw echo); direct = the first",
        "pinning": ctx.pinning.describe(),
        "runs": runs,
        "proxy command": ctx.args.proxy_cmd,
    } | (_tls_metadata(ctx, handshakes) if ctx.certs is not None else {})


def _tls_metadata(ctx: Context, handshakes: Sequence[str]) -> dict[str, Any]:
    assert ctx.certs is not None
    return {
        "TLS": f"{h2load.TLS_VERSION} {h2load.TLS13_CIPHER} on both legs: h2load offers only "
        f"that suite and the {h2load.TLS_GROUP} group; HAProxy TLS 1.3 with that suite on "
        "both sides; goecho TLS 1.3 only (Go picks that suite first on AES hardware); "
        "our proxy as it is (TLS 1.2+, its OpenSSL defaults); ALPN h2 everywhere",
        "certificates": ctx.certs.describe(),
        "backend TLS handshakes, as goecho saw them": "; ".join(handshakes) or "none logged",
        "proxy TLS command": ctx.args.proxy_tls_cmd,
    }


def reference_failures(rows: Sequence[Row]) -> list[Row]:
    bad = (NOT_AVAILABLE, report.ERRORS)
    return [r for r in rows if r.target in REFERENCES and r.status in bad]


def run_all(ctx: Context, sup: procs.Supervisor) -> tuple[list[Row], list[str]]:
    """The rows of every target and scenario, and what the TLS backends negotiated.

    h2c and TLS scenarios have backends of their own, and each target runs once in front of
    each kind, h2c first: a proxy process is set up for one or the other.
    """
    chosen = scenarios(ctx.args)
    fleets = [
        start_backends(
            sup,
            ctx.tools.goecho,
            ctx.args.backends,
            ctx.pinning.load_cpu,
            ctx.args.startup_timeout,
            ctx.certs if tls else None,
        )
        for tls in (False, True)
        if any(s.tls == tls for s in chosen)
    ]
    rows: list[Row] = []
    for name in (t for t in TARGETS if t in ctx.args.only):
        for backends in fleets:
            target = start_target(name, ctx, sup, backends, ctx.workdir)
            try:
                rows += bench_target(ctx, target, [s for s in chosen if s.tls == backends.tls])
            finally:
                if target.service is not None:
                    sup.stop(target.service)
    handshakes = [kind for b in fleets if b.tls for kind in backend_handshakes(b)]
    return rows, handshakes


def make_certs(args: argparse.Namespace, workdir: Path) -> certs.BenchCerts | None:
    """The run's certificates, in its temporary directory, when a TLS scenario runs."""
    if not any(key in TLS_SCENARIOS for key in args.scenarios):
        return None
    try:
        made = certs.make(workdir / "certs")
    except RuntimeError as exc:
        raise SetupError(str(exc)) from exc
    log(f"certificates: {made.describe()}")
    return made


def run(args: argparse.Namespace) -> int:
    found = find_tools(args)
    pinning = choose_pinning(args)
    with (
        tempfile.TemporaryDirectory(prefix="loadtest-") as tmp,
        procs.Supervisor(args.out / "logs", tools.REPO) as sup,
    ):
        workdir = Path(tmp)
        ctx = Context(args, found, pinning, workdir, make_certs(args, workdir))
        rows, handshakes = run_all(ctx, sup)
        meta = metadata(ctx, args.backends, handshakes)
    report.add_ratios(rows)
    print(report.write(args.out, rows, meta))
    log(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}")
    failures = reference_failures(rows)
    for row in failures:
        log(f"reference failed: {row.target} / {row.scenario.title}: {row.note}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return procs.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
