"""Why a well-behaved call hangs during issue 13's attack: a timeline, second by second.

Run from the repository root::

    python -m loadtest.overload_profile [--limits out-of-reach|default] [--seconds 20]

The attack of loadtest/overload_bench.py, but with its attackers in a process of their own (so
that they do not share a GIL with the probes), and three probes run side by side, each in a
loop with a 5 s deadline:

- ``proxy``: a grpcio client calling UnaryEcho through the proxy, to the backend the attackers
  use (and so over the proxy's backend connection they share);
- ``direct``: the same call straight to the backend, bypassing the proxy;
- ``loop``: ``GET /healthz`` on the proxy's admin endpoint, which runs on the proxy's event
  loop: its latency is how long the loop takes to get to a new ready socket.

For each second it prints the slowest call of each probe and the CPU each process used (from
/proc: proxy, backend, attackers). If ``proxy`` is slow while ``direct`` is fast the delay is
the proxy's; if ``loop`` is slow too, it is the proxy's loop (CPU or a long turn), otherwise a
queue behind the attack (a shared backend connection, its window or its write buffer).

This is a diagnostic, not a test: it never judges the figures.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from loadtest import overload_bench as ob
from proxy_examples.echo import echo_pb2, echo_pb2_grpc

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Probe:
    """Calls ``once`` in a loop; keeps (start, duration, error) per call."""

    def __init__(self, name: str, once: Callable[[], None]) -> None:
        self.name = name
        self.once = once
        self.calls: list[tuple[float, float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            error = ""
            try:
                self.once()
            except grpc.RpcError as exc:
                error = exc.code().name
            except OSError as exc:
                error = type(exc).__name__
            self.calls.append((started, time.monotonic() - started, error))
            self.stop.wait(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def grpc_probe(name: str, target: str) -> tuple[Probe, grpc.Channel]:
    channel = grpc.insecure_channel(target)
    stub = echo_pb2_grpc.EchoStub(channel)
    stub.UnaryEcho(echo_pb2.EchoRequest(message="warm-up"), timeout=10)
    return Probe(name, lambda: stub.UnaryEcho(echo_pb2.EchoRequest(message="hi"), timeout=5)), (
        channel
    )


def healthz_probe(port: int) -> Probe:
    def once() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        finally:
            conn.close()

    return Probe("loop", once)


def attack(args: argparse.Namespace) -> int:
    """The attackers alone, in this process, until killed."""
    attackers = [
        ob.Attacker(args.attack, args.streams, args.request_kib * 1024)
        for _ in range(args.connections)
    ]
    print("attacking", flush=True)
    for attacker in attackers:
        attacker.thread.join()
    return 0


def profile(args: argparse.Namespace) -> int:
    extra = ob.OUT_OF_REACH if args.limits == "out-of-reach" else []
    backend_port, port, admin, backend, proxy = ob.start(extra)
    procs: dict[str, subprocess.Popen[bytes]] = {"proxy": proxy, "backend": backend}
    probes: list[Probe] = []
    channels: list[grpc.Channel] = []
    try:
        ob.wait_port(backend_port, backend)
        ob.wait_port(port, proxy)
        targets = {"proxy": f"127.0.0.1:{port}", "direct": f"127.0.0.1:{backend_port}"}
        for name, target in targets.items():
            probe, channel = grpc_probe(name, target)
            probes.append(probe)
            channels.append(channel)
        probes.append(healthz_probe(admin))
        time.sleep(1)
        start = time.monotonic()
        procs["attackers"] = subprocess.Popen(
            [sys.executable, "-m", "loadtest.overload_profile", "--attack", str(port),
             "--connections", str(args.connections), "--streams", str(args.streams),
             "--request-kib", str(args.request_kib)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        cpu: list[dict[str, float]] = []
        rss: list[float] = []
        while time.monotonic() < start + args.seconds:
            cpu.append({name: cpu_seconds(p.pid) for name, p in procs.items()})
            rss.append(ob.rss(proxy.pid) / 2**20)
            time.sleep(1)
        for probe in probes:
            probe.close()
        report(probes, cpu, rss, start)
    finally:
        for channel in channels:
            channel.close()
        for proc in reversed(list(procs.values())):
            proc.terminate()
            proc.wait(10)
    return 0


def report(
    probes: list[Probe], cpu: list[dict[str, float]], rss: list[float], start: float
) -> None:
    names = [p.name for p in probes]
    header = "  s " + "".join(f"{n + ' max':>12}{'calls':>6}" for n in names)
    print(header + f"{'proxy CPU':>10}{'backend':>8}{'attack':>7}{'RSS MiB':>8}")
    for second in range(len(cpu) - 1):
        row = f"{second:3d} "
        for probe in probes:
            # A call belongs to the second it started in.
            inside = [c for c in probe.calls if second <= c[0] - start < second + 1]
            slowest = max((c[1] for c in inside), default=0.0)
            errors = sum(1 for c in inside if c[2])
            row += f"{slowest * 1000:9.0f} ms{len(inside):5d}{'!' if errors else ' '}"
        used = {k: cpu[second + 1].get(k, 0.0) - cpu[second].get(k, 0.0) for k in cpu[second + 1]}
        row += f"{used['proxy']:9.0%} {used['backend']:7.0%} {used.get('attackers', 0):6.0%}"
        print(row + f"{rss[second]:8.0f}", flush=True)
    for probe in probes:
        errors = [c[2] for c in probe.calls if c[2]]
        slowest = max((c[1] for c in probe.calls), default=0.0)
        print(
            f"{probe.name}: {len(probe.calls)} calls, slowest {slowest:.2f} s, errors {errors or 0}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", choices=["out-of-reach", "default"], default="out-of-reach")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--request-kib", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return attack(args) if args.attack else profile(args)


if __name__ == "__main__":
    sys.exit(main())
