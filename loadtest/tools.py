"""Finding the external tools, building the Go echo backend, and describing the machine."""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADTEST = REPO / "loadtest"
GOECHO_SRC = LOADTEST / "goecho"
BIN_DIR = LOADTEST / "bin"

# Where .ci/install-tools.sh puts them, then `go install`'s default, then PATH, then the sbin
# directories that a non-root PATH lacks (Debian's haproxy lives in /usr/sbin).
_EXTRA_DIRS = (REPO / ".tools" / "bin", Path.home() / "go" / "bin")
_LATE_DIRS = (Path("/usr/local/go/bin"), Path("/usr/sbin"), Path("/usr/local/sbin"))


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of rounds or calls)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def find(name: str) -> str | None:
    """Absolute path of an executable, looked up in the project's preferred order."""
    for directory in _EXTRA_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _LATE_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def build_goecho(go: str) -> Path:
    """``go build`` the echo backend into loadtest/bin/; raises RuntimeError on failure."""
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    target = BIN_DIR / "goecho"
    result = subprocess.run(
        [go, "build", "-o", str(target), "."],
        cwd=GOECHO_SRC,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build of loadtest/goecho failed:\n{result.stderr.strip()}")
    return target


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "?"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def haproxy_version(haproxy: str) -> str:
    line = _first_line([haproxy, "-v"])
    match = re.search(r"version (\S+)", line)
    return f"HAProxy {match.group(1)}" if match else line


def h2load_version(h2load: str) -> str:
    return _first_line([h2load, "--version"])


def ghz_version(ghz: str, go: str | None) -> str:
    """ghz's own --version says "dev" when it was `go install`ed: ask the binary's build info."""
    version = _first_line([ghz, "--version"])
    if go is not None:
        info = subprocess.run(
            [go, "version", "-m", ghz], capture_output=True, text=True, timeout=30, check=False
        )
        match = re.search(r"^\s*mod\s+github\.com/bojand/ghz\s+(\S+)", info.stdout, re.M)
        if match:
            return f"ghz {match.group(1)}"
    return f"ghz {version}"


def go_module_version(module: str) -> str:
    """The version of ``module`` that loadtest/goecho/go.mod requires."""
    text = (GOECHO_SRC / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(\S+)", text, re.M)
    return match.group(1) if match else "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def nproc() -> int:
    return len(os.sched_getaffinity(0))
