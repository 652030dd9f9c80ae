"""Helpers for the balancing end-to-end tests: registering backends in etcd, and asking a
proxy which backend answers which call.

Import as ``from balancing_e2e_support import ...`` (this folder is on ``sys.path`` under
pytest, as every test folder without ``__init__.py`` is).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any

import grpc
from backends import echo_stub
from etcd_support import EtcdServer

from proxy_examples.echo import echo_pb2

Metadata = Sequence[tuple[str, str]]
CALL_TIMEOUT_S = 10.0
SLOW_DELAY_S = 0.2
# Factory of the `slow_backend` fixture: name -> address.
SlowBackendFactory = Callable[[str], str]
# Calls in flight at once when mapping many keys: fast, and far below the proxy's 256 streams
# per connection and the echo backends' 64 worker threads.
WINDOW = 50


def register(etcd: EtcdServer, key: str, address: str, metadata: Any = None) -> None:
    """Put the value Go's etcd naming package writes: {"Op":0,"Addr":...,"Metadata":...}."""
    value = json.dumps({"Op": 0, "Addr": address, "Metadata": metadata})
    etcd.etcdctl("put", key, value)


def backend_of(channel: grpc.Channel, metadata: Metadata = ()) -> str:
    """The name of the backend that answers one UnaryEcho call with this metadata."""
    request = echo_pb2.EchoRequest(message="x")
    response = echo_stub(channel).UnaryEcho(
        request, metadata=list(metadata), timeout=CALL_TIMEOUT_S
    )
    return str(response.backend)


def count_backends(channel: grpc.Channel, calls: int, metadata: Metadata = ()) -> Counter[str]:
    """Which backends answer `calls` sequential calls, and how often."""
    return Counter(backend_of(channel, metadata) for _ in range(calls))


def map_keys(
    channel: grpc.Channel, header: str, keys: Iterable[str], extra: Metadata = ()
) -> dict[str, str]:
    """key -> the backend that answered a call carrying `header: key` (WINDOW at a time)."""
    stub = echo_stub(channel)
    request = echo_pb2.EchoRequest(message="x")
    answers: dict[str, str] = {}
    keys = list(keys)
    for start in range(0, len(keys), WINDOW):
        batch = keys[start : start + WINDOW]
        pending = [
            (
                key,
                stub.UnaryEcho.future(
                    request, metadata=[(header, key), *extra], timeout=CALL_TIMEOUT_S
                ),
            )
            for key in batch
        ]
        for key, future in pending:
            answers[key] = str(future.result().backend)
    return answers


def start_slow_backend(name: str) -> tuple[grpc.Server, str]:
    """A grpcio server whose ``echo.Echo/UnaryEcho`` always sleeps SLOW_DELAY_S, then answers
    ``backend=name``; returns it (started) with its address.

    Unlike ``x-echo-delay-ms``, the slowness is the backend's own, so a proxy cannot learn of
    it from the request: only from how long its calls stay in flight."""

    def unary(request: echo_pb2.EchoRequest, context: grpc.ServicerContext) -> object:
        context.send_initial_metadata([("x-backend", name)])
        # Sleep unless the call ends first (a cancelled call frees its worker at once).
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait(SLOW_DELAY_S)
        return echo_pb2.EchoResponse(message=request.message, backend=name)

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "UnaryEcho": grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=echo_pb2.EchoRequest.FromString,
                response_serializer=echo_pb2.EchoResponse.SerializeToString,
            )
        },
    )
    # More workers than the tests' callers: every call sleeps in parallel, none queues.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="slow"),
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise OSError("slow backend could not bind 127.0.0.1")
    server.start()
    return server, f"127.0.0.1:{port}"
