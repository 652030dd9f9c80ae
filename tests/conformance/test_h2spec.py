"""HTTP/2 conformance of the proxy's downstream side, checked by h2spec --strict.

    h2spec --strict [-t -k]  ->  proxy (python -m proxy serve)  ->  conformance/h2_backend.py

It runs against an h2c listener, and with ``-t -k`` against a TLS listener (h2spec has no
option for a CA file, so ``-k`` skips verifying the proxy's test certificate; it still
negotiates h2 by ALPN).  Every h2spec case must pass on both, except those in
KNOWN_EXCEPTIONS (case id -> reason, for both listeners).  A case id is ``<section
package>/<number>`` as h2spec numbers it, e.g. ``http2/6.9.2/1``; it can be rerun alone with
``h2spec --strict [-t -k] -p PORT http2/6.9.2/1``.  A known exception that passes again
fails the test too, so that the list stays honest.

Harness self-check: ``H2SPEC_TARGET=backend`` points h2spec straight at the h2 backend,
without the proxy (146/146 cases pass that way with h2 4.x and h2spec 2.x); the backend
serves h2c only, so the TLS run skips then.
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from h2_backend import running_backend
from proxy_process import start_proxy, tls_listen_args
from tls_support import TestCA
from tools import require_tool, tool_env

# case id -> why the proxy is allowed to fail it.  Starts empty: add only with a reason.
KNOWN_EXCEPTIONS: dict[str, str] = {}

H2SPEC_CASE_TIMEOUT_S = 5
# h2spec runs ~146 cases; in the worst case each one waits out its timeout.
H2SPEC_RUN_TIMEOUT_S = 900
# h2spec flags that make it speak TLS, per listener kind.
LISTENERS: dict[str, tuple[str, ...]] = {"h2c": (), "tls": ("-t", "-k")}
# Fewer cases than this means h2spec did not really run (it has 146 with --strict).
MIN_CASES = 140


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    description: str
    outcome: str  # "passed", "failed", "skipped"
    detail: str


_INVALID_XML_CHARS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def parse_junit(path: Path) -> list[CaseResult]:
    """Parse h2spec's JUnit report.

    h2spec copies raw frame bytes (e.g. NULs in PING payloads) into failure messages, which
    is not well-formed XML, so such characters are escaped before parsing.
    """
    raw = _INVALID_XML_CHARS.sub(lambda m: b"\\x%02x" % m.group()[0], path.read_bytes())
    root = ET.fromstring(raw)
    results: list[CaseResult] = []
    for suite in root.iter("testsuite"):
        package = suite.get("package") or suite.get("name") or "?"
        for number, case in enumerate(suite.iter("testcase"), start=1):
            description = case.get("classname") or case.get("name") or ""
            outcome, detail = "passed", ""
            for tag in ("failure", "error"):
                element = case.find(tag)
                if element is not None:
                    outcome = "failed"
                    detail = (element.text or element.get("message") or "").strip()
            if outcome == "passed" and case.find("skipped") is not None:
                outcome = "skipped"
            results.append(CaseResult(f"{package}/{number}", description, outcome, detail))
    return results


def run_h2spec(h2spec: str, port: int, report: Path, *flags: str) -> tuple[list[CaseResult], str]:
    command = [
        h2spec,
        "--strict",
        *flags,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-o",
        str(H2SPEC_CASE_TIMEOUT_S),
        "-j",
        str(report),
    ]
    completed = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=H2SPEC_RUN_TIMEOUT_S,
        env=tool_env(),
    )
    output = completed.stdout + completed.stderr
    if not report.exists():
        pytest.fail(
            f"h2spec wrote no JUnit report (exit {completed.returncode}):\n{output[-5000:]}",
            pytrace=False,
        )
    return parse_junit(report), output


def check_results(results: list[CaseResult], output: str) -> None:
    summary = output.strip().splitlines()[-1:] if output.strip() else []
    assert len(results) >= MIN_CASES, (
        f"h2spec reported only {len(results)} cases (expected >= {MIN_CASES}); "
        f"output tail:\n{output[-3000:]}"
    )
    by_id = {r.case_id: r for r in results}
    unknown = sorted(set(KNOWN_EXCEPTIONS) - set(by_id))
    failing = [r for r in results if r.outcome == "failed" and r.case_id not in KNOWN_EXCEPTIONS]
    stale = [r for r in results if r.case_id in KNOWN_EXCEPTIONS and r.outcome == "passed"]
    problems: list[str] = []
    if failing:
        problems.append(f"{len(failing)} h2spec case(s) failed:")
        for r in failing:
            detail = "\n".join("      " + line for line in r.detail.splitlines()[:6])
            problems.append(f"  {r.case_id}: {r.description}\n{detail}")
    if stale:
        problems.append("KNOWN_EXCEPTIONS entries that pass now (remove them):")
        problems.extend(f"  {r.case_id}: {r.description}" for r in stale)
    if unknown:
        problems.append(f"KNOWN_EXCEPTIONS entries h2spec does not have: {unknown}")
    if problems:
        problems.append(f"h2spec summary: {' '.join(summary)}")
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.needs_tool("h2spec")
@pytest.mark.timeout(H2SPEC_RUN_TIMEOUT_S + 120)
@pytest.mark.parametrize("listener", LISTENERS)
def test_h2spec_strict(listener: str, tmp_path: Path, tls_ca: TestCA) -> None:
    h2spec = require_tool("h2spec")
    report = tmp_path / "h2spec-junit.xml"
    flags = LISTENERS[listener]
    with running_backend() as backend_port:
        if os.environ.get("H2SPEC_TARGET") == "backend":
            if listener != "h2c":
                pytest.skip("H2SPEC_TARGET=backend: the h2 backend serves h2c only")
            check_results(*run_h2spec(h2spec, backend_port, report))
            return
        args = ["serve", "--backend", f"127.0.0.1:{backend_port}"]
        if listener == "tls":
            args += tls_listen_args(tls_ca.issue_server("proxy"))
        with start_proxy(args) as (_, port):
            # Checked inside the `with`, so that a failure also shows the proxy's output.
            check_results(*run_h2spec(h2spec, port, report, *flags))


def test_parse_junit_escapes_control_bytes(tmp_path: Path) -> None:
    """The report parser copes with h2spec's raw bytes and numbers cases per section."""
    report = tmp_path / "r.xml"
    report.write_bytes(
        b'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n'
        b'<testsuite name="7. Error Codes" package="http2/7" tests="2">\n'
        b'<testcase package="http2/7" classname="GOAWAY unknown code">'
        b"<error>PING opaque_data:h2spec\x00\x00</error></testcase>\n"
        b'<testcase package="http2/7" classname="RST_STREAM unknown code"></testcase>\n'
        b'<testcase package="http2/7" classname="skipped one"><skipped/></testcase>\n'
        b"</testsuite></testsuites>\n"
    )
    results = parse_junit(report)
    assert [(r.case_id, r.outcome) for r in results] == [
        ("http2/7/1", "failed"),
        ("http2/7/2", "passed"),
        ("http2/7/3", "skipped"),
    ]
    assert "h2spec\\x00\\x00" in results[0].detail
