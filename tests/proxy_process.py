"""Run the proxy (``python -m proxy ...``) as a subprocess for black-box tests.

Import as ``from proxy_process import start_proxy`` (``tests/`` is on ``sys.path`` under
pytest, see ``tests/backends.py``).

Usage::

    from proxy_process import start_proxy

    with start_proxy(["serve", "--backend", f"127.0.0.1:{backend_port}"]) as (proc, port):
        ...  # the proxy accepts TCP connections on 127.0.0.1:port

If ``args`` has no TCP ``--listen``, a free port is picked and ``--listen 127.0.0.1:PORT`` is
appended (after any ``unix:`` listener: the proxy opens its listeners in the order given, so
once that port accepts, the Unix socket does too; :func:`short_socket_path` names one).
:func:`tls_listen_args` makes the flags of a TLS listener. A ``serve`` without ``--admin``
(flag or ``GRPC_ETCD_PROXY_ADMIN`` in ``env``) gets ``--admin 127.0.0.1:0``, so that proxies
of parallel tests do not fight over port 9901.

The proxy prints nothing guaranteed, so readiness means "its port accepts a TCP connection".
Its stdout and stderr go to temporary files; they are printed (so pytest shows them) when the
proxy fails to start, exits early, or the ``with`` body raises, and :func:`proxy_output` reads
them at any time.  At exit the proxy gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tls_support import CertFiles

REPO_ROOT = Path(__file__).resolve().parent.parent

# pid -> (stdout path, stderr path) of the proxies started by start_proxy and still running.
_OUTPUTS: dict[int, tuple[Path, Path]] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections; raise if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        if port_accepts(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.05)


def listen_address(args: list[str]) -> str | None:
    """The first TCP ``--listen`` in ``args`` (``--listen X`` or ``--listen=X``), if any;
    a ``tls:``/``h2c:`` scheme is dropped, Unix sockets are passed over."""
    for i, arg in enumerate(args):
        value = None
        if arg == "--listen" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--listen="):
            value = arg.split("=", 1)[1]
        if value is None or value.startswith("unix:"):
            continue
        return value.removeprefix("tls:").removeprefix("h2c:")
    return None


def tls_listen_args(
    certs: CertFiles, port: int | None = None, client_ca: Path | None = None
) -> list[str]:
    """``--listen tls:127.0.0.1:PORT --tls-cert .. --tls-key ..``: a TLS listener serving
    ``certs``, on a free port unless ``port`` is given; ``client_ca`` adds
    ``--tls-client-ca`` (mutual TLS)."""
    port = free_port() if port is None else port
    args = ["--listen", f"tls:127.0.0.1:{port}", "--tls-cert", str(certs.cert)]
    args += ["--tls-key", str(certs.key)]
    if client_ca is not None:
        args += ["--tls-client-ca", str(client_ca)]
    return args


@contextlib.contextmanager
def short_socket_path(name: str = "proxy.sock") -> Iterator[str]:
    """A path for a Unix socket, in a new directory under /tmp that is removed afterwards.

    ``sun_path`` holds 108 bytes, and pytest's ``tmp_path`` (or a long ``TMPDIR``) can be
    longer than that. Stop whatever listens on it before the ``with`` ends.
    """
    folder = tempfile.mkdtemp(prefix="gp-", dir="/tmp")
    path = os.path.join(folder, name)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(folder)


def has_flag(args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "*"):
        host = "127.0.0.1" if host != "::" else "::1"
    return host, int(port)


def import_checkout(env: dict[str, str]) -> None:
    """Put this checkout first on ``env``'s PYTHONPATH, so that `python -m proxy` imports it
    even without an editable install."""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m proxy *args`` to its end, from this checkout, as a user runs it: output
    captured as text, no stdin. ``env`` is added to a copy of ``os.environ`` without its
    ``GRPC_ETCD_PROXY_*`` variables (so a stray export cannot change what a test sees)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_ETCD_PROXY_")}
    full_env.update(env or {})
    import_checkout(full_env)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def proxy_output(proc: subprocess.Popen[bytes]) -> str:
    """What the proxy has printed so far (stdout, then stderr)."""
    paths = _OUTPUTS.get(proc.pid)
    if paths is None:
        return ""
    stdout_path, stderr_path = paths
    out = stdout_path.read_text(errors="replace")
    err = stderr_path.read_text(errors="replace")
    return f"--- proxy stdout ---\n{out}--- proxy stderr ---\n{err}"


def _dump(proc: subprocess.Popen[bytes], why: str) -> None:
    print(f"=== proxy (pid {proc.pid}) {why}; command: {proc.args!r}", file=sys.stderr)
    print(proxy_output(proc), file=sys.stderr, flush=True)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


@contextlib.contextmanager
def start_proxy(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    startup_timeout: float = 20.0,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start ``python -m proxy *args``, wait for its port, yield ``(Popen, port)``."""
    args = list(args)
    address = listen_address(args)
    if address is None:
        host, port = "127.0.0.1", free_port()
        args += ["--listen", f"{host}:{port}"]
    else:
        host, port = split_host_port(address)

    full_env = dict(os.environ if env is None else env)
    if args[:1] == ["serve"] and not (
        has_flag(args, "--admin") or "GRPC_ETCD_PROXY_ADMIN" in full_env
    ):
        args += ["--admin", "127.0.0.1:0"]
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    import_checkout(full_env)

    with tempfile.TemporaryDirectory(prefix="proxy-test-") as tmp:
        stdout_path = Path(tmp) / "stdout.log"
        stderr_path = Path(tmp) / "stderr.log"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *args],
                cwd=REPO_ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        _OUTPUTS[proc.pid] = (stdout_path, stderr_path)
        try:
            try:
                wait_for_port(host, port, startup_timeout, proc)
            except (RuntimeError, TimeoutError) as exc:
                _dump(proc, f"failed to start: {exc}")
                raise RuntimeError(
                    f"proxy failed to start on {host}:{port}: {exc}\n{proxy_output(proc)}"
                ) from None
            try:
                yield proc, port
            except (GeneratorExit, pytest.skip.Exception):
                raise
            except BaseException:
                _dump(proc, "output at the time of the failure")
                raise
            if proc.poll() is not None:
                _dump(proc, f"exited early with code {proc.returncode}")
        finally:
            stop_process(proc)
            _OUTPUTS.pop(proc.pid, None)


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class ClosedPort:
    """A port bound but never listening: connecting to it is refused at once (RST), and no
    other process can take it while the test runs (unlike a port that was free a moment ago)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


def log_events(proc: subprocess.Popen[bytes], event: str) -> list[dict[str, Any]]:
    """The proxy's JSON log lines (stderr is not a terminal: JSON) whose event is ``event``."""
    found = []
    for line in proxy_output(proc).splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found
