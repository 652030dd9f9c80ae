"""The proxy process fed by etcd: calls follow registrations, routes pick pools by service, and
failures say what is wrong. Real etcd, real proxy process, real grpcio backends and clients."""

from __future__ import annotations

import grpc
import pytest
from backends import EchoBackendsFactory, echo_stub, open_channel
from etcd_support import EtcdServer
from proxy_process import start_proxy, wait_for

from proxy_examples.echo import echo_pb2


def backends_answering(target: str, calls: int = 6) -> set[str]:
    with open_channel(target) as channel:
        stub = echo_stub(channel)
        seen = set()
        for _ in range(calls):
            try:
                seen.add(stub.UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=5).backend)
            except grpc.RpcError:
                seen.add("error")
        return seen


def test_calls_follow_etcd_registrations(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    b0, b1 = echo_backends(2)
    etcd.etcdctl("put", f"svc/{b0.address}", f'{{"Op":0,"Addr":"{b0.address}","Metadata":null}}')
    # A sibling prefix must not leak into svc's pool.
    etcd.etcdctl("put", f"svc-v2/{b1.address}", b1.address)
    with start_proxy(["serve", "--etcd", etcd.endpoint, "--target", "svc"]) as (_, port):
        target = f"127.0.0.1:{port}"
        wait_for(lambda: backends_answering(target) == {"b0"}, "svc to be served by b0 only")
        etcd.etcdctl("put", f"svc/{b1.address}", b1.address)  # bare address (seed 001)
        wait_for(lambda: backends_answering(target) == {"b0", "b1"}, "b1 to join")
        etcd.etcdctl("del", f"svc/{b0.address}")
        wait_for(lambda: backends_answering(target) == {"b1"}, "b0 to leave")


def test_routes_send_each_service_to_its_pool(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    b0, b1 = echo_backends(2)
    etcd.etcdctl("put", f"echo-a/{b0.address}", f'{{"Addr":"{b0.address}","Metadata":"a"}}')
    etcd.etcdctl("put", f"echo-b/{b1.address}", f'{{"Addr":"{b1.address}"}}')
    health = "grpc.health.v1.Health"
    args = [
        "serve",
        "--etcd",
        etcd.endpoint,
        "--route",
        "echo.Echo=echo-a",
        "--route",
        f"{health}=echo-b",
    ]
    with start_proxy(args) as (_, port):
        target = f"127.0.0.1:{port}"
        wait_for(lambda: backends_answering(target) == {"b0"}, "echo.Echo to go to echo-a")
        with open_channel(target) as channel:
            # The health service goes to echo-b: stopping b0 (echo-a's only backend) must not
            # touch it, while echo.Echo calls now fail.
            b0.stop(0).wait()
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            check(b"", timeout=5)
            with pytest.raises(grpc.RpcError) as down:
                echo_stub(channel).UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=5)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert b0.address in (down.value.details() or "")
            # No route and no default target: UNIMPLEMENTED naming the service.
            other = channel.unary_unary(
                "/other.Service/Method",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as err:
                other(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "other.Service" in (err.value.details() or "")


def test_etcd_unreachable_at_start_says_so_then_recovers(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    (b0,) = echo_backends(1)
    etcd.stop()
    with start_proxy(["serve", "--etcd", etcd.endpoint, "--target", "svc"]) as (_, port):

        def refusal() -> str:
            with open_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
                echo_stub(channel).UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            return err.value.details() or ""

        # The proxy listens before its first etcd attempt has failed: until then a call is
        # told the first listing is awaited. Then it says why.
        wait_for(lambda: "etcd unreachable" in refusal(), "calls to say etcd is unreachable")
        etcd.start()
        etcd.etcdctl("put", f"svc/{b0.address}", b0.address)
        wait_for(
            lambda: backends_answering(f"127.0.0.1:{port}") == {"b0"},
            "the pool to fill once etcd is up",
            timeout_s=20,
        )


def test_static_backend_is_the_fallback_while_etcd_has_none(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    b0, b1 = echo_backends(2)
    args = ["serve", "--etcd", etcd.endpoint, "--target", "svc", "--backend", b0.address]
    with start_proxy(args) as (_, port):
        target = f"127.0.0.1:{port}"
        wait_for(lambda: backends_answering(target) == {"b0"}, "the static fallback to serve")
        etcd.etcdctl("put", f"svc/{b1.address}", b1.address)
        wait_for(lambda: backends_answering(target) == {"b1"}, "etcd's pool to take over")
