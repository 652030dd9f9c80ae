"""gRPC-Web through proxies set up for one test each: backends registered in etcd (balanced
round robin, pinned by header, like native calls), HTTP/1 limits, and gRPC-Web switched off."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from backends import EchoBackendsFactory
from etcd_support import EtcdServer
from grpcweb_support import BINARY_CT, UNARY, RawHttp1, curl, echo_body, web_request
from proxy_process import start_proxy, wait_for

PIN = "x-pin"


def _register(etcd: EtcdServer, key: str, address: str) -> None:
    etcd.etcdctl("put", key, json.dumps({"Op": 0, "Addr": address, "Metadata": None}))


def test_balanced_and_pinned_through_etcd(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory, tmp_path: Path
) -> None:
    servers = echo_backends(3)
    for server in servers:
        _register(etcd, f"svc/{server.name}", server.address)
    args = ["serve", "--etcd", etcd.endpoint, "--target", "svc", "--pin-header", PIN]
    names = {s.name for s in servers}
    with start_proxy(args) as (_, port):
        client = RawHttp1(port)

        def backends(calls: int, headers: list[tuple[str, str]]) -> Counter[str]:
            seen: Counter[str] = Counter()
            for _ in range(calls):
                r = client.web_call(web_request(UNARY, echo_body(text=True), headers=headers))
                assert r.grpc_status == 0, r.grpc_message
                seen[r.messages[0].backend] += 1
            return seen

        try:
            wait_for(lambda: set(backends(6, [])) == names, "the pool to hold all 3 backends")
            # Round robin per call, on one keep-alive connection: each backend in turn.
            assert backends(9, []) == Counter({name: 3 for name in names})
            for server in servers:
                assert backends(4, [(PIN, server.name)]) == Counter({server.name: 4})
        finally:
            client.close()
        # The same over HTTP/2 (curl, one connection per call).
        url = f"http://127.0.0.1:{port}{UNARY}"
        h2 = Counter(
            curl(url, echo_body(), http2=True, tmp=tmp_path).messages[0].backend for _ in range(6)
        )
        assert h2 == Counter({name: 2 for name in names})
        pinned = curl(url, echo_body(), http2=True, headers=[f"{PIN}: b1"], tmp=tmp_path)
        assert pinned.messages[0].backend == "b1"
        unknown = curl(url, echo_body(), http2=True, headers=[f"{PIN}: nope"], tmp=tmp_path)
        assert unknown.grpc_status == 14  # UNAVAILABLE, the proxy's own trailers-only answer


def test_http1_limits(echo_backends: EchoBackendsFactory, tmp_path: Path) -> None:
    (server,) = echo_backends(1)
    args = ["serve", "--backend", server.address, "--http1-max-header-size", "2048"]
    args += ["--http1-max-request-line", "300", "--http1-max-body-size", "10000"]
    args += ["--preface-timeout", "0.5"]
    with start_proxy(args) as (_, port):

        def answer(request: bytes) -> int:
            client = RawHttp1(port)
            try:
                client.send(request)
                status, headers, _ = client.read_response()
                assert headers["connection"] == "close"
                assert client.closed_by_peer()
                return status
            finally:
                client.close()

        assert answer(web_request("/" + "a" * 400, echo_body())) == 414
        assert answer(web_request(UNARY, echo_body(), headers=[("x-big", "b" * 3000)])) == 431
        assert answer(web_request(UNARY, echo_body(payload=b"x" * 20000))) == 413
        # Chunked, so no content-length to refuse it up front: the call fails on the way.
        client = RawHttp1(port)
        try:
            body = echo_body(payload=b"x" * 20000)
            client.send(
                f"POST {UNARY} HTTP/1.1\r\nhost: p\r\ncontent-type: {BINARY_CT}\r\n"
                "transfer-encoding: chunked\r\n\r\n".encode()
                + b"%x\r\n" % len(body)
                + body
                + b"\r\n0\r\n\r\n"
            )
            r = client.read_web_response()
            assert r.grpc_status == 8  # RESOURCE_EXHAUSTED
            assert "--http1-max-body-size" in r.grpc_message
        finally:
            client.close()
        # A head that stops half-way (slow loris) gets 408 once the preface timeout is up.
        slow = RawHttp1(port)
        try:
            slow.send(f"POST {UNARY} HTTP/1.1\r\nhost: p\r\n".encode())
            status, headers, _ = slow.read_response()
            assert status == 408 and headers["connection"] == "close"
        finally:
            slow.close()
        # Within the limits all is well.
        ok = curl(f"http://127.0.0.1:{port}{UNARY}", echo_body(), http2=False, tmp=tmp_path)
        assert ok.grpc_status == 0


def test_grpc_web_off_gives_the_old_answer(
    echo_backends: EchoBackendsFactory, tmp_path: Path
) -> None:
    (server,) = echo_backends(1)
    with start_proxy(["serve", "--backend", server.address, "--no-grpc-web"]) as (_, port):
        client = RawHttp1(port)
        try:
            client.send(web_request(UNARY, echo_body(text=True)))
            status, _headers, chunks = client.read_response()
        finally:
            client.close()
        assert status == 505
        assert b"HTTP/1 is refused" in b"".join(c for _, c in chunks)
