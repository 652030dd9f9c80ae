"""gRPC-Web unary calls through the proxy beside native gRPC calls through the same proxy to the
same backend, in one run: calls/s and calls per proxy CPU-second, and the ratios.

    PATH=$PWD/.tools/bin:$PATH .venv/bin/python -m loadtest.grpcweb_bench [--duration 5]

The load is h2load for every scenario (one generator, so the figures compare): native gRPC
over h2c, gRPC-Web binary and text over HTTP/2 (what browsers use over TLS), and gRPC-Web
binary over HTTP/1.1 (h2load --h1, one call at a time per connection, as browsers do on
cleartext). The first row runs against a proxy started with --no-grpc-web, to show what the
gRPC-Web check costs native calls (the native rows run twice, alternating, best run shown).
The backend is loadtest/goecho (grpc-go) when Go is there, else the grpcio echo server. A
peer proxy (Envoy's grpc_web filter) is compared with only where one can run: Debian has no
envoy package and nothing may be downloaded here, so the script says so and compares with
native gRPC through the proxy.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest import cpustat, procs
from loadtest.tools import build_goecho, find

PATH = "/echo.Echo/UnaryEcho"
# One EchoRequest{message: "hello"}: the same 12 bytes in every scenario.
MESSAGE = b"\x0a\x05hello"
FRAME = b"\x00" + struct.pack(">I", len(MESSAGE)) + MESSAGE


@dataclass(frozen=True)
class Scenario:
    name: str
    headers: tuple[str, ...]
    body: bytes
    h1: bool = False
    web: bool = True  # the proxy runs with gRPC-Web on


SCENARIOS = (
    Scenario("native h2c, --no-grpc-web", ("content-type: application/grpc", "te: trailers"),
             FRAME, web=False),
    Scenario("native h2c", ("content-type: application/grpc", "te: trailers"), FRAME),
    Scenario("gRPC-Web binary, HTTP/2",
             ("content-type: application/grpc-web+proto", "x-grpc-web: 1"), FRAME),
    Scenario("gRPC-Web text, HTTP/2",
             ("content-type: application/grpc-web-text", "x-grpc-web: 1"),
             base64.b64encode(FRAME)),
    Scenario("gRPC-Web binary, HTTP/1.1",
             ("content-type: application/grpc-web+proto", "x-grpc-web: 1"), FRAME, h1=True),
)  # fmt: skip

_DONE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_RATE = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    calls_per_s: float
    proxy_cpu_s: float
    calls: int

    @property
    def per_cpu_s(self) -> float:
        return self.calls / self.proxy_cpu_s if self.proxy_cpu_s else 0.0


def start(argv: list[str], port: int, what: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    import socket

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}: {' '.join(argv)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{what} did not listen on {port}")


def run_h2load(
    h2load: str, port: int, scenario: Scenario, duration_s: float, workdir: Path
) -> tuple[float, int]:
    body = workdir / "body.bin"
    body.write_bytes(scenario.body)
    args = [h2load, "-t", "1", "-D", f"{round(duration_s)}s", "-d", str(body)]
    # HTTP/1.1 has one call at a time per connection: as many connections as HTTP/2 has
    # streams in flight (8 x 16), so the proxy sees the same concurrency.
    args += ["--h1", "-c", "128", "-m", "1"] if scenario.h1 else ["-c", "8", "-m", "16"]
    for header in scenario.headers:
        args += ["-H", header]
    out = subprocess.run(
        [*args, f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, timeout=duration_s + 60, check=False,
    ).stdout  # fmt: skip
    done = _DONE.search(out)
    rate = _RATE.search(out)
    status = _STATUS.search(out)
    if not (done and rate and status):
        raise SystemExit(f"h2load output not understood:\n{out}")
    succeeded, failed, errored = int(done[4]), int(done[5]), int(done[6])
    if failed or errored or int(status[1]) != succeeded or not succeeded:
        raise SystemExit(f"{scenario.name}: calls failed:\n{out}")
    return float(rate[1]), succeeded


def check_answer(port: int, scenario: Scenario) -> None:
    """One call with curl first: the answer must be a real gRPC success, not just a 200."""
    curl = shutil.which("curl")
    if curl is None:
        return
    argv = [curl, "-sS", "--http1.1" if scenario.h1 else "--http2-prior-knowledge", "-D", "-",
            "-o", "/dev/null", "--data-binary", "@-"]  # fmt: skip
    for header in scenario.headers:
        argv += ["-H", header]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{PATH}"],
        input=scenario.body, capture_output=True, timeout=10, check=False,
    ).stdout.decode("latin-1")  # fmt: skip
    if " 200" not in out.split("\r\n", 1)[0] or "grpc-status: 1" in out:
        raise SystemExit(f"{scenario.name}: unexpected answer:\n{out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    args = parser.parse_args(argv)
    h2load = find("h2load")
    if h2load is None:
        raise SystemExit("needs h2load (apt-get install nghttp2-client)")
    envoy = find("envoy")
    with tempfile.TemporaryDirectory(prefix="grpcweb-bench-") as tmp:
        workdir = Path(tmp)
        backend_port = procs.free_port()
        go = find("go")
        if go is not None:
            backend_argv = [str(build_goecho(go)), "-addr", f"127.0.0.1:{backend_port}"]
            backend_name = "goecho (grpc-go)"
        else:
            backend_argv = [sys.executable, "-m", "proxy_examples.echo.server",
                            "--port", str(backend_port)]  # fmt: skip
            backend_name = "grpcio echo"
        backend = start(backend_argv, backend_port, "backend")
        results: list[Result] = []
        try:
            # The native rows run twice, alternating the two proxies, and the better run of
            # each counts: on two cores the noise between runs is larger than the difference.
            for web in (False, True, False, True):
                port = procs.free_port()
                proxy_argv = [sys.executable, "-m", "proxy", "serve", "--backend",
                              f"127.0.0.1:{backend_port}", "--listen", f"127.0.0.1:{port}",
                              "--admin", "off", "--access-log-sample", "0",
                              "--grpc-web" if web else "--no-grpc-web"]  # fmt: skip
                proxy = start(proxy_argv, port, "proxy")
                try:
                    for scenario in SCENARIOS:
                        seen = any(r.scenario is scenario for r in results)
                        if scenario.web != web or (seen and scenario.name.startswith("gRPC")):
                            continue
                        check_answer(port, scenario)
                        run_h2load(h2load, port, scenario, 1, workdir)  # warm-up
                        cpu_before = cpustat.process_seconds([proxy.pid])
                        rate, calls = run_h2load(h2load, port, scenario, args.duration, workdir)
                        cpu = cpustat.process_seconds([proxy.pid]) - cpu_before
                        results.append(Result(scenario, rate, cpu, calls))
                        procs.log(f"{scenario.name}: {rate:,.0f} calls/s")
                finally:
                    procs.stop(proxy)
        finally:
            procs.stop(backend)
    best: dict[str, Result] = {}
    for r in results:
        if r.scenario.name not in best or r.calls_per_s > best[r.scenario.name].calls_per_s:
            best[r.scenario.name] = r
    results = list(best.values())
    native = best["native h2c"]
    print(f"\nbackend: {backend_name}; h2load -t 1, {args.duration:g} s per scenario; "
          "HTTP/2: -c 8 -m 16, HTTP/1.1: --h1 -c 128")  # fmt: skip
    print(
        f"{'scenario':32} {'calls/s':>10} {'calls/CPU-s':>12} {'vs native':>10} {'per CPU-s':>10}"
    )
    for r in results:
        print(
            f"{r.scenario.name:32} {r.calls_per_s:10,.0f} {r.per_cpu_s:12,.0f} "
            f"{r.calls_per_s / native.calls_per_s:9.2f}x {r.per_cpu_s / native.per_cpu_s:9.2f}x"
        )
    if envoy is None:
        print(
            "\nEnvoy: not installed and not installable here (no Debian package, and no "
            "downloads); gRPC-Web is compared with native gRPC through the proxy only."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
