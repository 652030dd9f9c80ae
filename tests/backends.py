"""Helpers for running echo backends in tests (in-process or as a subprocess).

Import as ``from backends import ...``: ``tests/`` has no ``__init__.py``, so pytest puts it
on ``sys.path`` when it loads ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from proxy_examples.echo import echo_pb2_grpc
from proxy_examples.echo.server import MAX_MESSAGE_BYTES, EchoServer, serve

if TYPE_CHECKING:
    from tls_support import CertFiles

# Types of the conftest fixtures, for annotating tests.
EchoBackendsFactory = Callable[[int], list[EchoServer]]
TLSEchoBackendsFactory = Callable[..., list[EchoServer]]
EchoSubprocessFactory = Callable[..., tuple[subprocess.Popen[str], int]]

REPO_ROOT = Path(__file__).resolve().parent.parent
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (racy: prefer binding port 0 directly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_echo_backends(count: int, first: int = 0) -> list[EchoServer]:
    """Start ``count`` in-process echo backends on free ports, named ``b<first>``, ...."""
    return [serve(0, name=f"b{i}")[0] for i in range(first, first + count)]


def start_tls_echo_backends(
    count: int, certs: CertFiles, client_ca: Path | None = None, first: int = 0
) -> list[EchoServer]:
    """Start ``count`` in-process TLS echo backends named ``tls<first>``, ... serving ``certs``.

    ``client_ca``: require client certificates it signed (mutual TLS); calls then carry the
    client's identity in ``x-peer-cn`` / ``x-peer-uri`` / ``x-peer-dns`` initial metadata.
    The names differ from the cleartext ``b<i>`` so a test can run both kinds side by side.
    """
    return [
        serve(0, name=f"tls{i}", tls_cert=certs.cert, tls_key=certs.key, tls_client_ca=client_ca)[0]
        for i in range(first, first + count)
    ]


def start_echo_subprocess(
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 15.0,
    *,
    certs: CertFiles | None = None,
    client_ca: Path | None = None,
) -> tuple[subprocess.Popen[str], int]:
    """Run ``python -m proxy_examples.echo.server`` and return it once it listens, with its port.

    Use this when a test must ``kill -9`` the backend. ``stderr`` is a pipe carrying the
    ``cancelled <method> backend=<name>`` lines; it is only drained by the caller, so keep
    the volume small. The caller owns the process (the ``echo_subprocess`` fixture kills it).
    ``certs`` serves TLS with them, and ``client_ca`` then requires client certificates.
    The files are read once at start: to rotate a backend's certificate, restart it.
    """
    cmd = [sys.executable, "-m", "proxy_examples.echo.server", "--port", str(port), "--host", host]
    if name is not None:
        cmd += ["--name", name]
    if certs is not None:
        cmd += ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
    if client_ca is not None:
        cmd += ["--tls-client-ca", str(client_ca)]
    # The project is not necessarily installed; make "proxy" importable from the checkout.
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            line = proc.stdout.readline()
            if line.startswith("listening "):
                return proc, int(line.rsplit(":", 1)[1])
            if not line:  # EOF: the backend died before listening
                break
    proc.kill()
    _, err = proc.communicate()
    raise RuntimeError(f"echo backend subprocess did not start: {err.strip()}")


def stop_subprocess(proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    """SIGTERM the process, SIGKILL it if it lingers, and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.communicate()


def open_channel(target: str) -> grpc.Channel:
    """An insecure channel that allows messages up to the backend's 256 MiB limit."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def open_tls_channel(
    target: str,
    ca: Path | None,
    client: CertFiles | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A TLS channel like :func:`open_channel`, verifying the server against ``ca``.

    ``ca`` None trusts grpcio's built-in roots. ``client``: present this certificate (mutual
    TLS). ``server_name``: the name to verify the server's certificate against (and send as
    SNI and ``:authority``) instead of the host in ``target``.
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca is not None else None,
        private_key=client.key.read_bytes() if client is not None else None,
        certificate_chain=client.cert.read_bytes() if client is not None else None,
    )
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


def echo_stub(channel: grpc.Channel) -> echo_pb2_grpc.EchoStub:
    """An ``echo.Echo`` stub on ``channel``."""
    return echo_pb2_grpc.EchoStub(channel)


def _status_class() -> type[Message]:
    # googleapis-common-protos is not a dependency, so describe google.rpc.Status at runtime
    # and decode with real protobuf rather than trusting the server's hand-written encoder.
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    fdp = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/status.proto",
        package="google.rpc",
        dependency=["google/protobuf/any.proto"],
        syntax="proto3",
    )
    msg = fdp.message_type.add(name="Status")
    field = descriptor_pb2.FieldDescriptorProto
    msg.field.add(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    msg.field.add(name="message", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    msg.field.add(
        name="details",
        number=3,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".google.protobuf.Any",
    )
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


_STATUS = _status_class()


def parse_status_details(data: bytes) -> tuple[int, str, list[tuple[str, bytes]]]:
    """Decode ``grpc-status-details-bin`` into (code, message, [(type_url, value)])."""
    status: Any = _STATUS.FromString(data)  # dynamic class: fields unknown to mypy
    return status.code, status.message, [(d.type_url, d.value) for d in status.details]
