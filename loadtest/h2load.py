"""Running h2load against a gRPC target and reading its report.

h2load knows HTTP/2, not gRPC: it counts a response as a success on ``:status 200`` alone, and a
gRPC error comes back as 200 with a ``grpc-status`` trailer and no message. So besides h2load's own
failed/errored/timeout counts and status codes, each run checks that the response bodies add up
to one echoed message per successful call: an error answer carries no DATA and shows up short,
and that every connection made calls (one whose TLS handshake hung makes none, and h2load does
not count it as a failure in a timed run).

Over TLS (an https:// URL) h2load offers TLS 1.3 with one cipher suite and one key-exchange
group only (:data:`TLS13_CIPHER`, :data:`TLS_GROUP`), so every target negotiates the same; the
run then checks what h2load says its first connection negotiated.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.stats import Measurement, percentile

PATH = "/echo.Echo/UnaryEcho"
HEADERS = ("content-type: application/grpc", "te: trailers")
TLS_VERSION = "TLSv1.3"
TLS13_CIPHER = "TLS_AES_128_GCM_SHA256"
TLS_GROUP = "X25519"
ALPN = "h2"

_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", re.M)
_REQUESTS = re.compile(
    r"^requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_TRAFFIC = re.compile(r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?\((\d+)\) data", re.M)
_REQUEST_TIME = re.compile(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", re.M)
_CLIENT_RATE = re.compile(r"^req/s\s+:\s+([\d.]+)", re.M)  # per client: min, max, mean...
_TLS_LINES = {
    "protocol": re.compile(r"^TLS Protocol: (.+)$", re.M),
    "cipher": re.compile(r"^Cipher: (.+)$", re.M),
    "temp_key": re.compile(r"^Server Temp Key: (.+)$", re.M),
    "alpn": re.compile(r"^Application protocol: (.+)$", re.M),
}
_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6}


def grpc_frame(payload_size: int) -> bytes:
    """One uncompressed gRPC message: flag byte, big-endian length, payload."""
    return b"\x00" + struct.pack(">I", payload_size) + b"x" * payload_size


@dataclass(frozen=True)
class Load:
    """How hard and how long to push: h2load's -c, -m and either -D or -n."""

    clients: int
    streams: int
    duration_s: float | None = None
    requests: int | None = None

    def budget_s(self) -> float:
        """A generous bound on the wall time of the run, to kill a hung one."""
        if self.duration_s is not None:
            return self.duration_s + 30
        return 300


def url(address: str, tls: bool = False) -> str:
    """The echo method's URL at ``address``: https:// makes h2load speak TLS with ALPN h2."""
    return f"{'https' if tls else 'http'}://{address}{PATH}"


def argv(h2load: str, url: str, body: Path, load: Load, log_file: Path | None) -> list[str]:
    args = [h2load, "-t", "1", "-c", str(load.clients), "-m", str(load.streams)]
    if url.startswith("https://"):
        # h2load also offers TLS 1.2, but every server here picks 1.3 when offered (HAProxy
        # and goecho are set to 1.3 only); the run checks that it was 1.3.
        args += ["--tls13-ciphers", TLS13_CIPHER, "--groups", TLS_GROUP]
    if load.duration_s is not None:
        # h2load's <DURATION> is an integer with an optional unit: "0.5" is refused.
        args += ["-D", f"{max(1, round(load.duration_s * 1000))}ms"]
    else:
        args += ["-n", str(load.requests or 1)]
    for header in HEADERS:
        args += ["-H", header]
    args += ["-d", str(body)]
    if log_file is not None:
        args += ["--log-file", str(log_file)]
    return [*args, url]


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected h2load duration {text!r}")
    return float(match.group(1)) * _UNIT_US[match.group(2)]


def _search(pattern: re.Pattern[str], output: str) -> re.Match[str]:
    match = pattern.search(output)
    if match is None:
        raise ValueError(f"h2load output lacks {pattern.pattern!r}")
    return match


@dataclass(frozen=True)
class Report:
    """The figures h2load prints at the end of a run."""

    elapsed_us: float
    req_per_s: float
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    status_other: int
    data_bytes: int
    mean_us: float
    # The lowest calls/s of one client: 0 when a connection made no call at all.
    client_min_req_per_s: float | None = None
    # What the first TLS connection negotiated, as h2load prints it (None over h2c).
    tls_protocol: str | None = None
    tls_cipher: str | None = None
    tls_temp_key: str | None = None
    tls_alpn: str | None = None
    runs: int = 1  # how many h2load runs make this report (see combine)


def _optional(pattern: re.Pattern[str], output: str) -> str | None:
    match = pattern.search(output)
    return match.group(1).strip() if match else None


def parse(output: str) -> Report:
    finished = _search(_FINISHED, output)
    requests = {k: int(v) for k, v in _search(_REQUESTS, output).groupdict().items()}
    status = [int(v) for v in _search(_STATUS, output).groups()]
    traffic = _search(_TRAFFIC, output)
    request_time = _search(_REQUEST_TIME, output)
    return Report(
        elapsed_us=float(finished.group(1)) * _UNIT_US[finished.group(2)],
        req_per_s=float(finished.group(3)),
        started=requests["started"],
        done=requests["done"],
        succeeded=requests["succeeded"],
        failed=requests["failed"],
        errored=requests["errored"],
        timeout=requests["timeout"],
        status_2xx=status[0],
        status_other=sum(status[1:]),
        data_bytes=int(traffic.group(3)),
        mean_us=_duration_us(request_time.group(3)),
        client_min_req_per_s=float(rate) if (rate := _optional(_CLIENT_RATE, output)) else None,
        tls_protocol=_optional(_TLS_LINES["protocol"], output),
        tls_cipher=_optional(_TLS_LINES["cipher"], output),
        tls_temp_key=_optional(_TLS_LINES["temp_key"], output),
        tls_alpn=_optional(_TLS_LINES["alpn"], output),
    )


def combine(reports: Sequence[Report]) -> Report:
    """One report for several runs one after the other: counts and times added up, calls/s
    over the runs' own time (not the gaps between them), the TLS lines where all runs agree."""
    if not reports:
        raise ValueError("no h2load runs to combine")
    elapsed_us = sum(r.elapsed_us for r in reports)
    succeeded = sum(r.succeeded for r in reports)
    rates = [r.client_min_req_per_s for r in reports if r.client_min_req_per_s is not None]

    def agreed(values: Sequence[str | None]) -> str | None:
        distinct = set(values)
        if len(distinct) == 1:
            return distinct.pop()
        return " / ".join(sorted(v or "none" for v in distinct))  # shows as a problem

    return Report(
        elapsed_us=elapsed_us,
        req_per_s=succeeded / (elapsed_us / 1e6) if elapsed_us else 0.0,
        started=sum(r.started for r in reports),
        done=sum(r.done for r in reports),
        succeeded=succeeded,
        failed=sum(r.failed for r in reports),
        errored=sum(r.errored for r in reports),
        timeout=sum(r.timeout for r in reports),
        status_2xx=sum(r.status_2xx for r in reports),
        status_other=sum(r.status_other for r in reports),
        data_bytes=sum(r.data_bytes for r in reports),
        mean_us=sum(r.mean_us * r.succeeded for r in reports) / max(1, succeeded),
        client_min_req_per_s=min(rates) if rates else None,
        tls_protocol=agreed([r.tls_protocol for r in reports]),
        tls_cipher=agreed([r.tls_cipher for r in reports]),
        tls_temp_key=agreed([r.tls_temp_key for r in reports]),
        tls_alpn=agreed([r.tls_alpn for r in reports]),
        runs=sum(r.runs for r in reports),
    )


def problems(report: Report, response_size: int) -> list[str]:
    """Everything that says the run did not go cleanly."""
    found: list[str] = []
    if report.succeeded == 0:
        found.append("no call succeeded")
    counts = (("failed", report.failed), ("errored", report.errored))
    found += [f"{n} {what}" for what, n in (*counts, ("timed out", report.timeout)) if n]
    if report.status_other:
        found.append(f"{report.status_other} non-2xx responses")
    # Responses still in flight when a timed run stops may add partial bodies, never remove any.
    missing = report.succeeded * response_size - report.data_bytes
    if missing > 0:
        found.append(f"~{-(-missing // response_size)} responses without the echoed message")
    if report.succeeded and report.client_min_req_per_s == 0:
        found.append("a connection made no call (h2load's lowest per-client req/s is 0)")
    return found + _tls_problems(report)


def _tls_problems(report: Report) -> list[str]:
    """A TLS run that negotiated anything but the pinned version, suite, group and ALPN."""
    if report.tls_protocol is None:
        return []
    found = [
        f"negotiated {what} {got}, not {wanted}"
        for what, got, wanted in (
            ("version", report.tls_protocol, TLS_VERSION),
            ("cipher", report.tls_cipher, TLS13_CIPHER),
            ("ALPN", report.tls_alpn, ALPN),
        )
        if got != wanted
    ]
    if not (report.tls_temp_key or "").startswith(TLS_GROUP + " "):
        found.append(f"negotiated key exchange {report.tls_temp_key}, not {TLS_GROUP}")
    return found


def latencies_us(log_file: Path) -> list[float]:
    """Per-request times from h2load's --log-file (third column, microseconds), ascending."""
    values: list[float] = []
    try:
        with log_file.open() as lines:
            for line in lines:
                columns = line.split("\t")
                if len(columns) >= 3 and columns[1] == "200":
                    values.append(float(columns[2]))
    except OSError:
        return []
    values.sort()
    return values


def measurement(report: Report, log_file: Path | None, response_size: int) -> Measurement:
    """A Measurement from h2load's report, with percentiles if there is a per-request log."""
    times = latencies_us(log_file) if log_file is not None else []
    mean = sum(times) / len(times) if times else report.mean_us
    return Measurement(
        calls=report.succeeded,
        calls_per_s=report.req_per_s,  # h2load's figure: succeeded calls over the run time
        mean_us=mean,
        p50_us=percentile(times, 50),
        p99_us=percentile(times, 99),
        problems=problems(report, response_size),
        raw={"h2load": report.__dict__, "logged_requests": len(times)},
    )
