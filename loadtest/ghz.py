"""Running ghz (a real gRPC client with protobuf encoding) and reading its JSON report."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.stats import Measurement

CALL = "echo.Echo/UnaryEcho"
NS_PER_US = 1000.0


def request_json(payload_size: int) -> str:
    """An EchoRequest (protos/echo.proto) in ghz's JSON form."""
    payload = base64.b64encode(b"x" * payload_size).decode()
    return json.dumps({"message": "bench", "payload": payload})


@dataclass(frozen=True)
class Load:
    """ghz's -c and either -z (duration) or -n (call count)."""

    concurrency: int
    duration_s: float | None = None
    requests: int | None = None

    def budget_s(self) -> float:
        if self.duration_s is not None:
            return self.duration_s + 30
        return 300


def argv(ghz: str, proto: Path, address: str, payload_size: int, load: Load) -> list[str]:
    args = [ghz, "--insecure", "--proto", str(proto), "--call", CALL]
    args += ["-d", request_json(payload_size), "-c", str(load.concurrency)]
    if load.duration_s is not None:
        args += ["-z", f"{load.duration_s:g}s"]
    else:
        args += ["-n", str(load.requests or 1)]
    return [*args, "--format", "json", address]


def _percentile_us(report: dict[str, Any], pct: int) -> float | None:
    for entry in report.get("latencyDistribution") or []:
        if entry.get("percentage") == pct:
            return float(entry["latency"]) / NS_PER_US
    return None


def measurement(output: str) -> Measurement:
    """A Measurement from ghz's --format json output; raises ValueError if it is not that."""
    try:
        report: dict[str, Any] = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ghz did not print a JSON report: {exc}") from exc
    codes: dict[str, int] = report.get("statusCodeDistribution") or {}
    ok = int(codes.get("OK", 0))
    problems = [f"{n} {code}" for code, n in sorted(codes.items()) if code != "OK" and n]
    if ok == 0:
        problems.insert(0, "no call succeeded")
    errors: dict[str, int] = report.get("errorDistribution") or {}
    raw = {k: v for k, v in report.items() if k not in ("details", "histogram", "options")}
    raw["errorDistribution"] = errors
    return Measurement(
        calls=ok,
        calls_per_s=float(report.get("rps", 0.0)) * ok / max(1, int(report.get("count", 0))),
        mean_us=float(report.get("average", 0)) / NS_PER_US or None,
        p50_us=_percentile_us(report, 50),
        p99_us=_percentile_us(report, 99),
        problems=problems,
        raw={"ghz": raw},
    )
