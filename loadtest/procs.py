"""Starting, probing and stopping the processes of a benchmark run, and how the run ends.

Every long-running process is started in its own session (process group), so that stopping it
also stops whatever it spawned, and a Ctrl-C in the terminal reaches only the benchmark, which
then stops them itself. :func:`run_main` gives every benchmark command the same exit statuses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

STOP_GRACE_S = 3.0
SETUP_FAILED = 2
INTERRUPTED = 130


class SetupError(Exception):
    """The benchmark cannot run at all."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C does: through SystemExit, so every
    `finally` that stops a started process still runs."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)


def run_main(body: Callable[[], int]) -> int:
    """A benchmark command's exit status: ``body()``'s own, 2 when it raises SetupError (said
    on stderr), 130 on Ctrl-C (or SIGTERM / SIGHUP, see :func:`exit_on_termination`). ``body``
    starts its processes under a :class:`Supervisor`, which stops them on the way out."""
    exit_on_termination()
    try:
        return body()
    except SetupError as exc:
        log(f"error: {exc}")
        return SETUP_FAILED
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return INTERRUPTED


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run under ``taskset -c CPU``, or as is when ``cpu`` is None."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after a grace period."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
    # The leader may be gone while children it spawned live on in its group.
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_S)


@dataclass
class Service:
    """A long-running process started by the benchmark, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Owns the services of a run; leaving the ``with`` block stops all of them."""

    def __init__(self, log_dir: Path, cwd: Path) -> None:
        self._log_dir = log_dir
        self._cwd = cwd
        self._services: list[Service] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str]) -> Service:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(name, proc, log_path)
        self._services.append(service)
        return service

    def stop(self, service: Service) -> None:
        stop(service.proc)
        if service in self._services:
            self._services.remove(service)

    def stop_all(self) -> None:
        while self._services:
            self.stop(self._services[-1])


def wait_for_port(service: Service, port: int, timeout_s: float) -> str | None:
    """Wait until 127.0.0.1:port accepts connections; None when it does, else why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = service.proc.poll()
        if code is not None:
            return f"{service.name} exited with status {code} before listening"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return None
        time.sleep(0.1)
    return f"{service.name} did not listen on port {port} within {timeout_s:.0f} s"


@dataclass(frozen=True)
class Completed:
    """The outcome of a short command run to completion."""

    argv: list[str]
    returncode: int | None  # None when it was killed for running too long
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run(argv: Sequence[str], timeout_s: float, cwd: Path | None = None) -> Completed:
    """Run a command, killing its whole process group if it outlives ``timeout_s``."""
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        code = None
    except BaseException:
        stop(proc)
        raise
    return Completed(list(argv), code, out.decode(errors="replace"), err.decode(errors="replace"))
