"""Every benchmark command in loadtest/ runs end to end, at its shortest settings.

The benchmarks are not tests: they never judge speed, and neither does this file. What it
checks is that each command starts what it needs, finishes with exit status 0, prints the
table (or lines) a reader relies on, with a row for each side it compares and its ratio, and
leaves no process behind. Each runs as a real subprocess (``python -m loadtest.<name>``) with
every output directory in pytest's ``tmp_path``, so nothing is written into loadtest/out/
(``loadtest/bin/goecho`` is still built there, as every run of the benches does; it is ignored
by git).

Every command is started with a marker variable in its environment, which every process it
starts inherits: after the command exits, no process may still carry it.

The tools come from ``.ci/install-tools.sh``: a missing one skips the test locally, naming it,
and fails it under CI (``tests/tools.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from tools import missing_tool, tool_env

from proxy.core.balancing.policies import POLICIES

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # loadtest/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from loadtest import certs as bench_certs  # noqa: E402
from loadtest import tools as bench_tools  # noqa: E402

RUN_TIMEOUT_S = 240.0  # a hung command is stopped (and the test fails) after this
LEAK_GRACE_S = 10.0  # how long the processes of a finished command may take to disappear
MARKER = "LOADTEST_SMOKE_RUN"
RATIO = re.compile(r"^\d+\.\d\d$")  # a ratio cell of sticky_bench / workers_bench
TIMES_RATIO = re.compile(r"^\d+\.\d\d\u00d7( \(latency\))?$")  # loadtest.bench's "vs HAProxy"


# --- tools ----------------------------------------------------------------------------------


def need(*names: str) -> None:
    """Each tool where the benches look for it (loadtest/tools.py: .tools/bin, ~/go/bin, PATH,
    /usr/local/go/bin, /usr/sbin)."""
    for name in names:
        if bench_tools.find(name) is None:
            missing_tool(name)


def need_etcd() -> None:
    """etcd as loadtest.etcd_latency looks for it: on PATH, not this venv's wrapper script."""
    venv_bin = Path(sys.prefix) / "bin"
    for directory in tool_env()["PATH"].split(os.pathsep):
        candidate = Path(directory) / "etcd"
        if directory and Path(directory) != venv_bin and os.access(candidate, os.X_OK):
            return
    missing_tool("etcd", " on PATH")


# --- running a command ----------------------------------------------------------------------


def _carrying(marker: bytes) -> list[int]:
    """Pids of the live processes whose environment holds ``marker`` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _assert_nothing_left(marker: bytes) -> None:
    """Every process started under ``marker`` is gone; leftovers are killed, then reported."""
    deadline = time.monotonic() + LEAK_GRACE_S
    left = _carrying(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _carrying(marker)
    if not left:
        return
    described = [f"{pid}: {_cmdline(pid)}" for pid in left]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    pytest.fail("processes left running after the command:\n" + "\n".join(described))


def run(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest.<module> args`` from the repository root, to completion; fails
    the test if the command hangs or leaves a process behind."""
    token = uuid.uuid4().hex
    env = tool_env()
    env[MARKER] = token
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", f"loadtest.{module}", *map(str, args)]
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # The benches turn SIGTERM into a clean stop of everything they started.
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(
                f"{' '.join(argv)} still ran after {RUN_TIMEOUT_S:g} s\n"
                f"--- stdout\n{out}\n--- stderr\n{err}"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _assert_nothing_left(f"{MARKER}={token}".encode())
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def succeeded(done: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, once it exited 0 (else the test fails, showing what it said)."""
    assert done.returncode == 0, (
        f"{' '.join(done.args)} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    return done.stdout


def table(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table under the header line ``header`` (which must be there,
    exactly, followed by its alignment line), one list per row, up to the first non-row."""
    lines = text.splitlines()
    assert header in lines, f"no table header {header!r} in:\n{text}"
    at = lines.index(header)
    assert re.fullmatch(r"\|( *-+:? *\|)+", lines[at + 1].replace(" ", "")), lines[at + 1]
    width = len(cells(header))
    rows = []
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        assert len(row) == width, f"{len(row)} cells, the header has {width}: {line}"
        rows.append(row)
    return rows


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def column(rows: Sequence[Sequence[str]], header: str, name: str) -> list[str]:
    return [row[cells(header).index(name)] for row in rows]


# --- the data-plane benchmarks (h2load, HAProxy, goecho) ------------------------------------

BENCH_HEADER = (
    "| scenario | target | calls/s | MB/s | mean | p50 | p99 | vs HAProxy | target CPU "
    "| load CPU | calls/CPU-s (vs HAProxy) | status |"
)
SCENARIOS = (
    "small unary 16 B, c=8 m=16",
    "1 MiB unary, c=4 m=2",
    "serial 16 B, c=1 m=1",
    "ghz unary 16 B, c=16",
)
TARGETS = {"direct (1 backend)": "direct", "HAProxy": "haproxy", "our proxy": "proxy"}


@pytest.mark.needs_tool("h2load", "haproxy", "ghz", "go")
def test_bench_compares_direct_haproxy_and_the_proxy_in_every_scenario(tmp_path: Path) -> None:
    need("h2load", "haproxy", "ghz", "go")
    out = tmp_path / "out"
    done = run("bench", "--duration", "0.2", "--warmup", "0.1", "--out", out)
    text = succeeded(done)

    assert text.startswith("# Data-plane benchmark\n")
    rows = table(text, BENCH_HEADER)
    # A row for each scenario and target, all measured cleanly (not "n/a", not ERRORS).
    assert {(r[0], r[1]) for r in rows} == {(s, t) for s in SCENARIOS for t in TARGETS}
    assert len(rows) == len(SCENARIOS) * len(TARGETS)
    for status in column(rows, BENCH_HEADER, "status"):
        assert status == "ok" or status.startswith("ok, disturbed: "), status
    # Every row has its ratio to HAProxy's (the serial scenario compares latency).
    for row in rows:
        ratio = column([row], BENCH_HEADER, "vs HAProxy")[0]
        assert TIMES_RATIO.fullmatch(ratio), row
        assert ratio.endswith("(latency)") == row[0].startswith("serial"), row
        if row[1] == "HAProxy":
            assert ratio.startswith("1.00\u00d7"), row

    # The same results on disk, in --out only; the logs of what it started beside them.
    assert (out / "results.md").read_text() == text.rstrip("\n") + "\n"
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["scenario"], r["target"]) for r in results) == sorted(
        (s, t) for s in ("small", "large", "serial", "ghz") for t in TARGETS.values()
    )
    logs = {p.name for p in (out / "logs").iterdir()}
    assert {"goecho-0.log", "goecho-1.log", "haproxy.log", "proxy.log"} <= logs
    assert f"written: {out / 'results.md'}" in done.stderr


TLS_SCENARIOS = (
    "TLS small unary 16 B, c=8 m=16",
    "TLS 1 MiB unary, c=4 m=2",
    "TLS new connection per call, 100 at a time",
)
TLS_COST_HEADER = (
    "| scenario | target | h2c calls/s | TLS calls/s | TLS \u00f7 h2c | h2c calls/CPU-s "
    "| TLS calls/CPU-s | TLS \u00f7 h2c per CPU-s | status |"
)
TLS_META = (
    "- TLS: TLSv1.3 TLS_AES_128_GCM_SHA256 on both legs: h2load offers only that suite and "
    "the X25519 group;"
)


def run_tls_bench(out: Path, only: str) -> tuple[str, list[list[str]]]:
    """The TLS scenarios and the h2c small one (for the TLS cost) at their shortest, through
    ``only``; the command's stdout and its table's rows, every one measured cleanly."""
    args = ["--only", only, "--scenarios", "small,tls", "--duration", "0.2", "--warmup", "0.1"]
    done = run("bench", *args, "--out", out)
    text = succeeded(done)
    rows = table(text, BENCH_HEADER)
    for row in rows:
        status = column([row], BENCH_HEADER, "status")[0]
        assert status == "ok" or status.startswith("ok, disturbed: "), row
    assert any(line.startswith(TLS_META) for line in text.splitlines()), text
    # goecho logged what the handshakes with it negotiated; each target's h2load checked its own.
    assert re.search(
        r"^- backend TLS handshakes, as goecho saw them: TLS 1\.3 TLS_AES_128_GCM_SHA256 "
        r"alpn=h2 resumed=false(; |$)",
        text,
        re.M,
    ), text
    return text, rows


@pytest.mark.needs_tool("h2load", "haproxy", "go")
def test_bench_tls_scenarios_direct_and_haproxy(tmp_path: Path) -> None:
    need("h2load", "haproxy", "go")
    out = tmp_path / "out"
    text, rows = run_tls_bench(out, "direct,haproxy")

    scenarios = ("small unary 16 B, c=8 m=16", *TLS_SCENARIOS)
    targets = ("direct (1 backend)", "HAProxy")
    assert [(r[0], r[1]) for r in rows] == [(s, t) for t in targets for s in scenarios]
    for row in rows:
        assert TIMES_RATIO.fullmatch(column([row], BENCH_HEADER, "vs HAProxy")[0]), row
    # The handshake rows have calls/CPU-s but no latency (see the legend).
    handshakes = [r for r in rows if r[0] == TLS_SCENARIOS[2]]
    assert [column([r], BENCH_HEADER, "mean")[0] for r in handshakes] == ["\u2013"] * 2
    for per_cpu in column(handshakes, BENCH_HEADER, "calls/CPU-s (vs HAProxy)"):
        assert re.fullmatch(r"[\d,]+ \(\d+\.\d\d\u00d7\)", per_cpu), per_cpu

    # TLS ÷ h2c of the small calls, for each target.
    costs = table(text, TLS_COST_HEADER)
    assert [(r[0], r[1]) for r in costs] == [(TLS_SCENARIOS[0], t) for t in targets]
    for row in costs:
        assert all(TIMES_RATIO.fullmatch(row[i]) for i in (4, 7)), row
        assert row[8] == "ok" or row[8].startswith("disturbed: the "), row

    payload = json.loads((out / "results.json").read_text())
    assert {(c["scenario"], c["target"]) for c in payload["tls_over_h2c"]} == {
        ("tls-small", "direct"),
        ("tls-small", "haproxy"),
    }
    logs = {p.name for p in (out / "logs").iterdir()}
    assert {"goecho-0.log", "goecho-tls-0.log", "haproxy.log", "haproxy-tls.log"} <= logs


@pytest.mark.needs_tool("openssl")
@pytest.mark.parametrize("use_cryptography", [True, False], ids=["cryptography", "openssl"])
def test_bench_certificates_verify_strictly(tmp_path: Path, use_cryptography: bool) -> None:
    """Both ways of making the TLS scenarios' certificates give a CA and two P-256 leaves for
    localhost and 127.0.0.1 that a strict verifier accepts (this machine has both, so the
    openssl fallback is checked here rather than by a run of the benchmark)."""
    need("openssl")
    made = bench_certs.make(tmp_path, use_cryptography=use_cryptography)
    openssl = str(bench_tools.find("openssl"))

    leaves = [made.listener_cert, made.backend_cert]
    verify = [openssl, "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", made.ca]
    done = subprocess.run([*verify, *leaves], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for leaf in leaves:
        text = subprocess.run(
            [openssl, "x509", "-in", leaf, "-noout", "-text"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "NIST CURVE: P-256" in text and "ecdsa-with-SHA256" in text, text
        assert "DNS:localhost, IP Address:127.0.0.1" in text, text
    # HAProxy's crt: the listener's certificate and key in one file.
    assert made.listener_pem.read_bytes() == (
        made.listener_cert.read_bytes() + made.listener_key.read_bytes()
    )
    assert made.made_with == ("cryptography" if use_cryptography else "openssl")


@pytest.mark.needs_tool("h2load", "haproxy", "go")
def test_serial_rounds_prints_a_ratio_per_round_and_their_median(tmp_path: Path) -> None:
    need("h2load", "haproxy", "go")
    out = tmp_path / "serial-rounds"
    text = succeeded(run("serial_rounds", "--rounds", "1", "--duration", "0.2", "--out", out))

    lines = text.splitlines()
    assert lines[0] == "round  direct  HAProxy  proxy   added: HAProxy  proxy  ratio"
    # round, the three means, the two added latencies, their ratio
    assert re.fullmatch(r" +1( +-?\d+){5} +-?\d+\.\d\d", lines[1]), lines[1]
    assert re.fullmatch(
        r"added-latency ratio proxy/HAProxy: median -?\d+\.\d\d, min -?\d+\.\d\d, "
        r"max -?\d+\.\d\d over 1 rounds \(\d at or under 1\.5\)",
        lines[2],
    ), lines[2]
    assert len(lines) == 3
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {r["target"] for r in rows} == {"direct", "haproxy", "proxy"}


STICKY_HEADER = (
    "| mode | calls/s (median) | rounds | proxy CPU | load core | backend CPU split "
    "| sticky / plain |"
)


@pytest.mark.needs_tool("h2load", "go")
def test_sticky_bench_compares_plain_and_sticky_proxies(tmp_path: Path) -> None:
    """Both proxies run at once (once, they fought over the admin port and the second died)."""
    need("h2load", "go")
    logs = tmp_path / "logs"
    text = succeeded(
        run("sticky_bench", "--rounds", "1", "--duration", "0.3", "--warmup", "0.1", "--logs", logs)
    )

    rows = table(text, STICKY_HEADER)
    assert [r[0] for r in rows] == ["plain", "sticky"]
    rounds_ = column(rows, STICKY_HEADER, "rounds")
    assert all(re.fullmatch(r"[\d,]+", r) for r in rounds_), rounds_  # one clean round each
    assert re.fullmatch(r"\d+%/\d+%", column(rows, STICKY_HEADER, "backend CPU split")[1])
    ratios = column(rows, STICKY_HEADER, "sticky / plain")
    assert ratios[0] == "1.00" and RATIO.fullmatch(ratios[1]), ratios
    assert re.search(r"^sticky / plain per round: \d+\.\d\d$", text, re.M), text
    assert re.search(r"^- load: .*header `x-key: abc` on every call", text, re.M), text
    assert {"goecho-0.log", "goecho-1.log", "plain.log", "sticky.log"} <= {
        p.name for p in logs.iterdir()
    }


WORKERS_HEADER = (
    "| workers | calls/s (median) | rounds | proxy CPU (cores) | machine busy "
    "| others (cores) | worker CPU split | vs 1 worker |"
)


@pytest.mark.needs_tool("h2load", "go")
def test_workers_bench_compares_one_and_two_workers(tmp_path: Path) -> None:
    need("h2load", "go")
    logs = tmp_path / "logs"
    args = ["--rounds", "1", "--duration", "0.3", "--warmup", "0.1", "--retries", "0"]
    text = succeeded(run("workers_bench", *args, "--logs", logs))

    rows = table(text, WORKERS_HEADER)
    assert [r[0] for r in rows] == ["1", "2"]
    rounds_ = column(rows, WORKERS_HEADER, "rounds")
    assert all(re.fullmatch(r"[\d,]+( \(disturbed: [\d.]+ cores\))?", r) for r in rounds_)
    # Two workers shared the load, and the table says how.
    assert re.fullmatch(r"\d+%/\d+%", column(rows, WORKERS_HEADER, "worker CPU split")[1])
    ratios = column(rows, WORKERS_HEADER, "vs 1 worker")
    assert ratios[0] == "1.00" and RATIO.fullmatch(ratios[1]), ratios
    assert re.search(r"^2 workers / 1 worker per round: \d+\.\d\d$", text, re.M), text
    assert {"proxy-1w.log", "proxy-2w.log"} <= {p.name for p in logs.iterdir()}


@pytest.mark.needs_tool("valgrind", "h2load", "haproxy", "go")
def test_instructions_counts_haproxy_and_the_proxy_under_callgrind() -> None:
    """The slowest of them all: both proxies start under valgrind (~10-15 s)."""
    need("valgrind", "callgrind_control", "h2load", "haproxy", "go")
    text = succeeded(run("instructions", "--calls", "10", "--warmup", "1"))

    lines = text.splitlines()
    assert len(lines) == 3, text
    for line, name in zip(lines[:2], ("haproxy", "proxy"), strict=True):
        pattern = rf"{name} +[\d,]+ instructions/call \(\d+ s under valgrind\)"
        assert re.fullmatch(pattern, line), line
    assert re.fullmatch(r"ratio proxy/haproxy: \d+\.\d\dx", lines[2]), lines[2]


@pytest.mark.needs_tool("valgrind", "ghz", "go")
def test_instructions_with_ghz_making_the_calls() -> None:
    need("valgrind", "callgrind_control", "ghz", "go")
    args = ["--load", "ghz", "--concurrency", "4", "--only", "proxy", "--calls", "10"]
    text = succeeded(run("instructions", *args, "--warmup", "1"))
    (line,) = text.splitlines()
    assert re.fullmatch(r"proxy +[\d,]+ instructions/call \(\d+ s under valgrind\)", line), line


# --- the control-plane and in-process benchmarks --------------------------------------------


@pytest.mark.needs_tool("etcd")
def test_etcd_latency_times_puts_and_deletes() -> None:
    need_etcd()
    args = ["--writes", "2", "--pool", "2", "--warmup", "2", "--timeout", "10"]
    text = succeeded(run("etcd_latency", *args))

    assert text.startswith("# etcd write -> pool latency\n")
    assert re.search(r"^- etcd: etcd \S+, started here", text, re.M), text
    header = "| operation | count | p50 | p90 | p99 | max | failures |"
    rows = table(text, header)
    # 2 writes: one put, one delete, none failed.
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("put (address appears)", "1", "0"),
        ("delete (address leaves)", "1", "0"),
        ("all", "2", "0"),
    ]
    for row in rows:
        assert all(re.fullmatch(r"[\d.]+ ms", cell) for cell in row[2:6]), row


def test_admin_scrape_bench_renders_both_ways() -> None:
    text = succeeded(run("admin_scrape_bench", "--paths", "2", "--backends", "2", "--repeat", "1"))

    assert re.match(r"2 paths x 2 backends: \d+ series, [\d.]+ MB\n", text), text
    rows = table(text, "| rendering | scrape (ms) | longest loop stall (ms) |")
    assert [r[0] for r in rows] == ["in the loop", "snapshot in the loop, text in a thread"]


def test_health_checks_bench_runs_every_mode() -> None:
    args = ["--backends", "2", "--interval", "0.05", "--seconds", "0.5"]
    text = succeeded(run("health_checks_bench", *args))

    lines = text.splitlines()
    assert lines[0] == "2 backends, every 0.05 s, 0.5 s a mode"
    lag = r"loop wake-up lag p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms"
    assert re.fullmatch(rf"idle +{lag}", lines[1]), lines[1]
    for line, mode in zip(lines[2:], ("active", "thread", "burst"), strict=True):
        checks = r" *\d+ checks, CPU per check +-?\d+ us \(loop thread +-?\d+ us\); "
        assert re.fullmatch(rf"{mode} {checks}{lag}", line), line


def test_hpack_bench_times_both_decoders_and_the_validation() -> None:
    text = succeeded(run("hpack_bench", "--blocks", "50", "--repeat", "1"))
    lines = text.splitlines()
    assert lines[0] == "new grpc-go request block, 51 blocks, best of 1:", lines
    assert re.fullmatch(r"  hpack Decoder +\d+\.\d us/block", lines[1]), lines
    assert re.fullmatch(
        r"  proxy CachingDecoder +\d+\.\d us/block \(\d+\.\dx faster\)", lines[2]
    ), lines
    assert re.fullmatch(r"  validate_request +\d+\.\d us/list", lines[3]), lines
    assert len(lines) == 4, lines


def test_pick_bench_prints_a_row_per_policy_and_per_rebuild() -> None:
    text = succeeded(run("pick_bench", "--sizes", "2,3", "--batch", "10", "--repeat", "1"))

    picks = table(text, "| policy: one pick | 2 backends (µs) | 3 backends (µs) |")
    labels = [*POLICIES, *(f"{p} (weights 1..4)" for p in POLICIES)]
    labels += ["sticky", "sticky + bounded load 1.25", "pin"]
    assert [r[0] for r in picks] == labels
    rebuilds = table(text, "| on a pool change | 2 backends (ms) | 3 backends (ms) |")
    assert len(rebuilds) == 5
    kinds = [r[0].split(",")[0] for r in rebuilds]
    assert kinds == ["policy state (PoolTable + the 3 policies)"] * 2 + ["ring"] * 3
    for row in [*picks, *rebuilds]:
        assert all(re.fullmatch(r"\d+(\.\d\d)?", cell) for cell in row[1:]), row


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--only", "nginx"], "argument --only: choose from direct,haproxy,proxy"),
        (
            ["--scenarios", "small,quic"],
            "argument --scenarios: choose from small,large,serial,ghz,tls-small,tls-large,"
            "tls-handshake,h2c,tls",
        ),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bench_refuses_a_bad_flag_before_starting_anything(
    tmp_path: Path, args: list[str], named: str
) -> None:
    out = tmp_path / "out"
    done = run("bench", *args, "--out", out)

    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.startswith("usage: python -m loadtest.bench ")
    assert f"python -m loadtest.bench: error: {named}" in done.stderr
    assert "building loadtest/goecho" not in done.stderr
    assert not out.exists()


# Last: the proxy's TLS rows, through its --listen tls: and --backend-tls flags.


@pytest.mark.needs_tool("h2load", "go")
def test_bench_tls_scenarios_through_the_proxy(tmp_path: Path) -> None:
    need("h2load", "go")
    out = tmp_path / "out"
    text, rows = run_tls_bench(out, "proxy")

    scenarios = ("small unary 16 B, c=8 m=16", *TLS_SCENARIOS)
    assert [(r[0], r[1]) for r in rows] == [(s, "our proxy") for s in scenarios]
    costs = table(text, TLS_COST_HEADER)
    assert [(r[0], r[1]) for r in costs] == [(TLS_SCENARIOS[0], "our proxy")]
    assert all(TIMES_RATIO.fullmatch(costs[0][i]) for i in (4, 7)), costs
    assert re.search(r"^- proxy TLS command: .* --listen tls:\{listen\} ", text, re.M), text
    assert {"proxy.log", "proxy-tls.log"} <= {p.name for p in (out / "logs").iterdir()}
