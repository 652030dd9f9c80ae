"""CPU instructions per serial call, HAProxy and this proxy side by side, under callgrind.

Wall-clock latency on a shared 2-core machine moves 10-30 % between runs; the number of
instructions a process executes per call does not (valgrind counts them, whatever else the
machine does). So this is the repeatable meter for the hot path: run it before and after a
change. It counts user-space instructions only: system calls and the kernel's TCP work, the
same for both proxies, are not in it.

    python -m loadtest.instructions                 # 1,000 calls each, about a minute
    python -m loadtest.instructions --calls 3000 --only proxy
    python -m loadtest.instructions --load ghz --concurrency 16 --only proxy

``--load ghz`` makes the calls with ghz (grpc-go's client: a new ``grpc-timeout`` on most calls,
BDP pings) instead of h2load (the same headers on every call). Under valgrind the proxy is
slow, so calls are far apart and nearly every one carries a new deadline: the worst case for
header caching.

Each proxy runs under ``valgrind --tool=callgrind`` in front of one goecho backend; h2load
makes serial calls (c=1, m=1, 16-byte messages); the counters are zeroed after a warm-up
(``callgrind_control -z``) and dumped after the measured calls (``-d``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest import bench, ghz, h2load, procs, tools

_SUMMARY = re.compile(r"^summary:\s+(\d+)", re.M)


def _callgrind(out: Path, argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]


@dataclass(frozen=True)
class Caller:
    """How the calls are made: ``tool`` is h2load or ghz, ``concurrency`` calls at a time."""

    tool: str
    path: str
    concurrency: int = 1

    def run(self, port: int, body: Path, calls: int) -> None:
        if self.tool == "ghz":
            load = ghz.Load(concurrency=self.concurrency, requests=calls)
            argv = ghz.argv(self.path, bench.PROTO, f"127.0.0.1:{port}", bench.SMALL, load)
            done = procs.run(argv, timeout_s=600)
            succeeded = ghz.measurement(done.stdout).calls if done.returncode == 0 else -1
        else:
            url = f"http://127.0.0.1:{port}{h2load.PATH}"
            hload = h2load.Load(clients=1, streams=self.concurrency, requests=calls)
            done = procs.run(h2load.argv(self.path, url, body, hload, None), timeout_s=600)
            report = h2load.parse(done.stdout) if done.returncode == 0 else None
            succeeded = report.succeeded if report is not None else -1
        if succeeded != calls:
            raise RuntimeError(
                f"{self.tool} did not complete {calls} calls:\n{done.stdout}{done.stderr}"
            )


def _control(command: str, pid: int) -> None:
    done = procs.run(["callgrind_control", command, str(pid)], timeout_s=120)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {command} failed: {done.stderr.strip()}")


def measure(
    sup: procs.Supervisor,
    name: str,
    argv: list[str],
    port: int,
    work: Path,
    caller: Caller,
    calls: int,
    warmup: int,
    keep: Path | None = None,
) -> float:
    """Instructions per call of the process started by ``argv``, listening on ``port``."""
    out = work / f"{name}.callgrind"
    service = sup.start(name, _callgrind(out, argv))
    failure = procs.wait_for_port(service, port, timeout_s=120)
    if failure is not None:
        raise RuntimeError(f"{failure}: {service.log_tail(5)}")
    body = work / "body"
    body.write_bytes(h2load.grpc_frame(bench.SMALL))
    caller.run(port, body, warmup)
    _control("-z", service.proc.pid)
    caller.run(port, body, calls)
    _control("-d", service.proc.pid)
    sup.stop(service)
    dumps = sorted(work.glob(f"{name}.callgrind.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"no callgrind dump for {name}")
    if keep is not None:  # for callgrind_annotate: where the instructions go
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(dumps[-1], keep / f"{name}.callgrind")
    match = _SUMMARY.search(dumps[-1].read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"no summary line in {dumps[-1]}")
    return int(match.group(1)) / calls


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.instructions", description=__doc__)
    parser.add_argument(
        "--calls", type=tools.positive_int, default=1000, help="measured calls (default 1000)"
    )
    parser.add_argument(
        "--warmup", type=tools.positive_int, default=200, help="calls before counting"
    )
    parser.add_argument("--only", default="haproxy,proxy", help="haproxy,proxy (default both)")
    parser.add_argument(
        "--load", choices=("h2load", "ghz"), default="h2load", help="who makes the calls"
    )
    parser.add_argument(
        "--concurrency",
        type=tools.positive_int,
        default=1,
        help="calls at a time (default 1: serial)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="copy each callgrind dump here as NAME.callgrind (for callgrind_annotate)",
    )
    parser.add_argument(
        "--proxy-cmd",
        default=bench.DEFAULT_PROXY_CMD,
        help="how to start the proxy (same fields as loadtest.bench's --proxy-cmd)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM/SIGHUP end the run like Ctrl-C, so the supervisor stops the valgrind processes.
    return procs.run_main(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    wanted = [t.strip() for t in args.only.split(",") if t.strip()]
    needed = ("valgrind", "callgrind_control", args.load, "go")
    found = {name: tools.find(name) for name in needed}
    if "haproxy" in wanted:
        found["haproxy"] = tools.find("haproxy")
    missing = [name for name, path in found.items() if path is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    paths = {name: path for name, path in found.items() if path is not None}
    goecho = tools.build_goecho(paths["go"])
    caller = Caller(args.load, paths[args.load], args.concurrency)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        work = Path(tmp)
        with procs.Supervisor(work / "logs", tools.REPO) as sup:
            backend_port = procs.free_port()
            backend = sup.start("goecho", [str(goecho), "-addr", f"127.0.0.1:{backend_port}"])
            failure = procs.wait_for_port(backend, backend_port, timeout_s=30)
            if failure is not None:
                print(failure, file=sys.stderr)
                return 2
            backends = [f"127.0.0.1:{backend_port}"]
            for name in wanted:
                port = procs.free_port()
                listen = f"127.0.0.1:{port}"
                if name == "haproxy":
                    cfg = work / "haproxy.cfg"
                    cfg.write_text(bench.haproxy_config(listen, backends))
                    cmd = [paths["haproxy"], "-db", "-f", str(cfg)]
                elif name == "proxy":
                    cmd = bench.proxy_argv(args.proxy_cmd, listen, backends)
                else:
                    print(f"unknown target {name!r}", file=sys.stderr)
                    return 2
                started = time.monotonic()
                results[name] = measure(
                    sup, name, cmd, port, work, caller, args.calls, args.warmup, args.keep
                )
                print(
                    f"{name:8} {results[name]:12,.0f} instructions/call "
                    f"({time.monotonic() - started:.0f} s under valgrind)",
                    flush=True,
                )
    if "haproxy" in results and "proxy" in results:
        print(f"ratio proxy/haproxy: {results['proxy'] / results['haproxy']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
