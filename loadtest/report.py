"""The results of a benchmark run: rows, ratios to HAProxy, Markdown and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.stats import Measurement

OK = "ok"
ERRORS = "errors"
NOT_AVAILABLE = "n/a"
SKIPPED = "skipped"

REFERENCE = "haproxy"
MIN_CPU_SHARE = 0.05  # below this the CPU figure is too coarse to divide by
DISTURBED = 0.1  # other processes' CPU, in cores, from which a row is flagged as disturbed
NONE = "\u2013"  # en dash: no figure
TIMES = "\u00d7"
TARGET_LABELS = {
    "direct": "direct (1 backend)",
    "haproxy": "HAProxy",
    "proxy": "our proxy",
    "proxy-pure": "our proxy, pure Python",
}


@dataclass(frozen=True)
class Scenario:
    """One kind of load, run against every target."""

    key: str
    title: str
    tool: str  # "h2load" or "ghz"
    payload_size: int
    clients: int  # h2load -c, ghz -c
    streams: int  # h2load -m (streams per connection); 1 for ghz
    latency_ratio: bool  # compare mean latency to HAProxy's instead of calls/s
    count_share: float  # share of -n that this scenario runs in fixed-count mode
    # h2load's --log-file gives percentiles but costs a write(2) per call on the load core,
    # about 18 % of the throughput of a saturated run: only latency scenarios use it.
    request_log: bool = False
    tls: bool = False  # the target listens with TLS and speaks TLS to TLS backends
    # One call per new connection, h2load run after h2load run ("clients" at a time).
    new_connections: bool = False
    h2c_twin: str | None = None  # the h2c scenario that this TLS one repeats (TLS cost)


@dataclass
class Row:
    """One target under one scenario."""

    scenario: Scenario
    target: str
    status: str
    note: str = ""
    measurement: Measurement | None = None
    target_cpu: float | None = None  # share of one core used by the target's processes
    load_cpu: float | None = None  # busy share of the core running load generator + backends
    other_cpu: float | None = None  # CPU used meanwhile by processes not of the benchmark
    ratio: float | None = None
    cpu_ratio: float | None = None  # calls per CPU-second of the target, relative to HAProxy's
    argv: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float | None:
        if self.measurement is None:
            return None
        return self.measurement.calls_per_s * self.scenario.payload_size / 1e6

    @property
    def calls_per_cpu_s(self) -> float | None:
        """Calls per second of the target's own CPU time: what one fully busy core would do.

        Fair where the load side, not the target, was the limit. Not for latency scenarios.
        """
        m, cpu = self.measurement, self.target_cpu
        if m is None or cpu is None or cpu < MIN_CPU_SHARE or self.scenario.latency_ratio:
            return None
        return m.calls_per_s / cpu


def from_measurement(scenario: Scenario, target: str, m: Measurement, argv: list[str]) -> Row:
    status = ERRORS if m.problems else OK
    return Row(scenario, target, status, "; ".join(m.problems), m, argv=argv)


def _ratio(row: Row, reference: Row) -> float | None:
    mine, theirs = row.measurement, reference.measurement
    if row.status != OK or reference.status != OK or mine is None or theirs is None:
        return None
    if row.scenario.latency_ratio:
        if mine.mean_us is None or not theirs.mean_us:
            return None
        return mine.mean_us / theirs.mean_us
    return mine.calls_per_s / theirs.calls_per_s if theirs.calls_per_s else None


def _cpu_ratio(row: Row, reference: Row) -> float | None:
    mine, theirs = row.calls_per_cpu_s, reference.calls_per_cpu_s
    if row.status != OK or reference.status != OK or mine is None or not theirs:
        return None
    return mine / theirs


def add_ratios(rows: Sequence[Row]) -> None:
    """Set each row's ratios to HAProxy's row of the same scenario, where both ran cleanly."""
    references = {r.scenario.key: r for r in rows if r.target == REFERENCE}
    for row in rows:
        reference = references.get(row.scenario.key)
        if reference is not None:
            row.ratio = _ratio(row, reference)
            row.cpu_ratio = _cpu_ratio(row, reference)


def _us(value: float | None) -> str:
    if value is None:
        return NONE
    if value < 1000:
        return f"{value:.0f} µs"
    if value < 1e6:
        return f"{value / 1000:.2f} ms"
    return f"{value / 1e6:.2f} s"


def _share(value: float | None) -> str:
    return NONE if value is None else f"{value * 100:.0f} %"


def _per_cpu(row: Row) -> str:
    value = row.calls_per_cpu_s
    if value is None:
        return NONE
    text = f"{value:,.0f}"
    return text if row.cpu_ratio is None else f"{text} ({row.cpu_ratio:.2f}{TIMES})"


def _status(row: Row) -> str:
    if row.status == OK:
        if _disturbed(row):
            return f"ok, disturbed: other processes used {_share(row.other_cpu)} of a core"
        return OK
    if row.status == ERRORS:
        return f"**ERRORS**: {row.note}"
    return f"{row.status}: {row.note}" if row.note else row.status


def _cells(row: Row) -> list[str]:
    m = row.measurement
    label = TARGET_LABELS.get(row.target, row.target)
    if m is None:
        return [row.scenario.title, label, "n/a", *[""] * (len(HEADER) - 4), _status(row)]
    ratio = NONE if row.ratio is None else f"{row.ratio:.2f}{TIMES}"
    if row.ratio is not None and row.scenario.latency_ratio:
        ratio += " (latency)"
    mb = row.mb_per_s
    return [
        row.scenario.title,
        label,
        f"{m.calls_per_s:,.0f}",
        NONE if mb is None else f"{mb:,.1f}",
        _us(m.mean_us),
        _us(m.p50_us),
        _us(m.p99_us),
        ratio,
        _share(row.target_cpu),
        _share(row.load_cpu),
        _per_cpu(row),
        _status(row),
    ]


HEADER = [
    "scenario",
    "target",
    "calls/s",
    "MB/s",
    "mean",
    "p50",
    "p99",
    "vs HAProxy",
    "target CPU",
    "load CPU",
    "calls/CPU-s (vs HAProxy)",
    "status",
]

LEGEND = """\
- **vs HAProxy**: calls/s ÷ HAProxy's calls/s in the same scenario (higher is better); for the
  serial scenario, mean latency ÷ HAProxy's mean latency (lower is better). Only between clean
  runs.
- **MB/s**: echoed payload bytes per second, one direction, 10⁶ bytes.
- **target CPU**: CPU time of the target's processes during the run, as a share of one core (for
  "direct", the backends'). **load CPU**: how busy the core of the load generator and backends was.
  A proxy well under 100 % while load CPU is near 100 % was held back by the load side.
  "disturbed": processes outside the benchmark used that much CPU during the run.
- **calls/CPU-s**: calls/s ÷ target CPU, what the target would do with its core fully busy;
  the fair comparison where the load side, not the target, was the limit.
- Latencies: h2load rows from h2load's per-request log; ghz rows from ghz's report. The TLS
  handshake rows have none: each h2load run opens all its connections at once, so a
  connection's time mostly measures its place in that queue.
- **TLS**: TLS 1.3, TLS_AES_128_GCM_SHA256, X25519, P-256 ECDSA certificates, on both legs.
  **TLS ÷ h2c**: a TLS scenario's figure ÷ the same target's in its h2c twin, in this run."""


@dataclass(frozen=True)
class TLSCost:
    """One target's TLS scenario beside its h2c twin from the same run: TLS ÷ h2c."""

    tls: Row
    h2c: Row

    @property
    def calls_ratio(self) -> float | None:
        mine, theirs = self.tls.measurement, self.h2c.measurement
        if mine is None or theirs is None or not theirs.calls_per_s:
            return None
        return mine.calls_per_s / theirs.calls_per_s

    @property
    def cpu_ratio(self) -> float | None:
        mine, theirs = self.tls.calls_per_cpu_s, self.h2c.calls_per_cpu_s
        return None if mine is None or not theirs else mine / theirs


def tls_costs(rows: Sequence[Row]) -> list[TLSCost]:
    """Each TLS row whose h2c twin ran for the same target in this run, both cleanly."""
    clean = {(r.scenario.key, r.target): r for r in rows if r.status == OK}
    pairs = []
    for row in rows:
        twin = row.scenario.h2c_twin
        h2c = clean.get((twin, row.target)) if twin else None
        if row.status == OK and h2c is not None:
            pairs.append(TLSCost(row, h2c))
    return pairs


TLS_COST_HEADER = [
    "scenario",
    "target",
    "h2c calls/s",
    "TLS calls/s",
    "TLS ÷ h2c",
    "h2c calls/CPU-s",
    "TLS calls/CPU-s",
    "TLS ÷ h2c per CPU-s",
    "status",
]


def _disturbed(row: Row) -> bool:
    return row.other_cpu is not None and row.other_cpu >= DISTURBED


def _ratio_cell(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}{TIMES}"


def _rate_cell(value: float | None) -> str:
    return NONE if value is None else f"{value:,.0f}"


def _tls_cost_cells(cost: TLSCost) -> list[str]:
    tls, h2c = cost.tls.measurement, cost.h2c.measurement
    assert tls is not None and h2c is not None  # tls_costs pairs clean rows only
    return [
        cost.tls.scenario.title,
        TARGET_LABELS.get(cost.tls.target, cost.tls.target),
        _rate_cell(h2c.calls_per_s),
        _rate_cell(tls.calls_per_s),
        _ratio_cell(cost.calls_ratio),
        _rate_cell(cost.h2c.calls_per_cpu_s),
        _rate_cell(cost.tls.calls_per_cpu_s),
        _ratio_cell(cost.cpu_ratio),
        _cost_status(cost),
    ]


def _cost_status(cost: TLSCost) -> str:
    """ "ok", or which of the two rows was disturbed (see _status): such a ratio can be off."""
    disturbed = [name for name, row in (("h2c", cost.h2c), ("TLS", cost.tls)) if _disturbed(row)]
    if not disturbed:
        return OK
    return f"disturbed: the {' and '.join(disturbed)} row{'s' if len(disturbed) > 1 else ''}"


def _tls_cost_section(rows: Sequence[Row]) -> list[str]:
    costs = tls_costs(rows)
    if not costs:
        return []
    lines = ["", "## TLS cost: each TLS scenario ÷ its h2c twin, same target, same run", ""]
    lines += ["| " + " | ".join(TLS_COST_HEADER) + " |", "|" + " --- |" * len(TLS_COST_HEADER)]
    return lines + ["| " + " | ".join(_tls_cost_cells(c)) + " |" for c in costs]


def markdown(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    lines = ["# Data-plane benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if not isinstance(value, dict)]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += _tls_cost_section(rows)
    return "\n".join([*lines, "", LEGEND, ""])


def _row_json(row: Row) -> dict[str, Any]:
    data: dict[str, Any] = {
        "scenario": row.scenario.key,
        "target": row.target,
        "status": row.status,
        "note": row.note,
        "mb_per_s": row.mb_per_s,
        "target_cpu": row.target_cpu,
        "load_cpu": row.load_cpu,
        "other_cpu": row.other_cpu,
        "ratio_to_haproxy": row.ratio,
        "calls_per_cpu_s": row.calls_per_cpu_s,
        "cpu_ratio_to_haproxy": row.cpu_ratio,
        "argv": row.argv,
        "scenario_settings": asdict(row.scenario),
    }
    if row.measurement is not None:
        data.update(asdict(row.measurement))
    return data


def write(out_dir: Path, rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """Write results.md and results.json to ``out_dir``; return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta)
    (out_dir / "results.md").write_text(text)
    tls_cost = [
        {
            "scenario": c.tls.scenario.key,
            "h2c_scenario": c.h2c.scenario.key,
            "target": c.tls.target,
            "calls_ratio": c.calls_ratio,
            "calls_per_cpu_s_ratio": c.cpu_ratio,
            "status": _cost_status(c),
        }
        for c in tls_costs(rows)
    ]
    payload = {
        "meta": meta,
        "results": [_row_json(row) for row in rows],
        "tls_over_h2c": tls_cost,
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text
