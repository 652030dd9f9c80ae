"""gRPC-Web calls through a proxy process to real grpcio backends: curl over HTTP/1.1 and
HTTP/2 (prior knowledge), binary and text mode, and a raw socket where curl would hide what
is checked (arrival times, keep-alive, a browser that goes away)."""

from __future__ import annotations

import base64
import itertools
import time
from pathlib import Path

import pytest
from grpcweb_support import (
    ALLOWED_ORIGIN,
    BINARY_CT,
    STREAM,
    TEXT_CT,
    UNARY,
    RawHttp1,
    WebProxy,
    curl,
    echo_body,
    frame,
    web_request,
)

from proxy_examples.echo import echo_pb2

MODES = [
    pytest.param(False, BINARY_CT, id="http1-binary"),
    pytest.param(False, TEXT_CT, id="http1-text"),
    pytest.param(True, BINARY_CT, id="h2-binary"),
    pytest.param(True, TEXT_CT, id="h2-text"),
]


@pytest.mark.parametrize(("http2", "content_type"), MODES)
def test_unary(web_proxy: WebProxy, tmp_path: Path, http2: bool, content_type: str) -> None:
    text = content_type == TEXT_CT
    r = curl(
        web_proxy.url(UNARY),
        echo_body("hello", payload=b"\x00\xff" * 10, text=text),
        http2=http2,
        content_type=content_type,
        tmp=tmp_path,
    )
    assert r.status == 200
    # grpcio answers application/grpc, which becomes application/grpc-web[-text].
    assert r.headers["content-type"] == (
        "application/grpc-web-text" if text else "application/grpc-web"
    )
    assert [m.message for m in r.messages] == ["hello"]
    assert r.messages[0].payload == b"\x00\xff" * 10
    assert r.messages[0].backend in ("b0", "b1")
    assert r.grpc_status == 0


@pytest.mark.parametrize(("http2", "content_type"), MODES)
def test_status_and_metadata_pass_through(
    web_proxy: WebProxy, tmp_path: Path, http2: bool, content_type: str
) -> None:
    """Metadata reaches the backend and comes back in the headers and in the trailer frame;
    a stream that fails after two messages ends with the backend's status and message."""
    text = content_type == TEXT_CT
    r = curl(
        web_proxy.url(STREAM),
        echo_body("m", count=5, text=text),
        http2=http2,
        content_type=content_type,
        headers=[
            "x-echo-meta-color: blue",
            "x-echo-meta-raw-bin: " + base64.b64encode(b"\x01\x02").decode(),
            "x-echo-fail-after: 2",
            "x-echo-status: 9",
            "x-echo-message: not today",
        ],
        tmp=tmp_path,
    )
    assert r.status == 200
    assert r.headers["x-echo-meta-color"] == "blue"
    assert base64.b64decode(r.headers["x-echo-meta-raw-bin"] + "==") == b"\x01\x02"
    assert len(r.messages) == 2
    assert r.trailers["x-echo-meta-color"] == "blue"
    assert r.grpc_status == 9  # FAILED_PRECONDITION
    assert r.grpc_message == "not today"
    assert "grpc-status-details-bin" in r.trailers


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_trailers_only_error(web_proxy: WebProxy, tmp_path: Path, http2: bool) -> None:
    """An error before any message (grpcio's answer to a method it does not have): one
    header block with grpc-status, and no body frames."""
    r = curl(web_proxy.url("/echo.Echo/NoSuchMethod"), echo_body(), http2=http2, tmp=tmp_path)
    assert r.status == 200
    assert r.headers["grpc-status"] == "12"  # UNIMPLEMENTED
    assert "grpc-message" in r.headers
    assert r.messages == [] and r.trailers == {}


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_deadline(web_proxy: WebProxy, tmp_path: Path, http2: bool) -> None:
    started = time.monotonic()
    r = curl(
        web_proxy.url(UNARY),
        echo_body(),
        http2=http2,
        headers=["grpc-timeout: 300m", "x-echo-delay-ms: 5000"],
        tmp=tmp_path,
    )
    assert r.grpc_status == 4  # DEADLINE_EXCEEDED, from the backend
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(("http2", "content_type"), MODES)
def test_four_mib_message(
    web_proxy: WebProxy, tmp_path: Path, http2: bool, content_type: str
) -> None:
    text = content_type == TEXT_CT
    payload = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
    r = curl(
        web_proxy.url(UNARY),
        echo_body("big", payload=payload, text=text),
        http2=http2,
        content_type=content_type,
        tmp=tmp_path,
    )
    assert r.grpc_status == 0
    assert len(r.messages) == 1 and r.messages[0].payload == payload


def test_server_stream_arrives_incrementally(web_proxy: WebProxy) -> None:
    """Twenty messages 100 ms apart, in text mode (what browsers use for streams): each arrives
    on its own as the backend sends it, not all at the end."""
    client = RawHttp1(web_proxy.port)
    try:
        started = time.monotonic()
        client.send(
            web_request(
                STREAM,
                echo_body("tick", count=20, text=True),
                headers=[("x-echo-interval-ms", "100")],
            )
        )
        status, headers, chunks = client.read_response()
    finally:
        client.close()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert len(chunks) == 21  # twenty messages, then the trailer frame
    arrivals = [t - started for t, _ in chunks]
    assert arrivals[0] < 1.0
    assert arrivals[-1] >= 1.8
    # Spread out as sent: every message came a while after the one before (not in a burst).
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(1 for g in gaps if g > 0.05) >= 15, gaps


def test_keep_alive_and_pipelining(web_proxy: WebProxy) -> None:
    client = RawHttp1(web_proxy.port)
    try:
        first = client.web_call(web_request(UNARY, echo_body("one", text=True)))
        # Two requests in one write: answered in order on the same connection.
        client.send(
            web_request(UNARY, echo_body("two", text=True))
            + web_request(UNARY, echo_body("three"), content_type=BINARY_CT)
        )
        second = client.read_web_response()
        third = client.read_web_response()
    finally:
        client.close()
    assert [r.messages[0].message for r in (first, second, third)] == ["one", "two", "three"]
    assert {first.messages[0].backend, second.messages[0].backend} == {"b0", "b1"}


def test_malformed_base64_fails_that_call_only(web_proxy: WebProxy) -> None:
    client = RawHttp1(web_proxy.port)
    try:
        bad = client.web_call(web_request(UNARY, b"AAAA*AAAAAAA"))
        good = client.web_call(web_request(UNARY, echo_body("after", text=True)))
    finally:
        client.close()
    assert bad.grpc_status == 13
    assert "invalid base64" in bad.grpc_message
    assert good.grpc_status == 0 and good.messages[0].message == "after"


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_truncated_frame(web_proxy: WebProxy, tmp_path: Path, http2: bool) -> None:
    message = echo_pb2.EchoRequest(message="cut").SerializeToString()
    r = curl(web_proxy.url(UNARY), frame(message)[:-2], http2=http2, tmp=tmp_path)
    assert r.grpc_status == 13
    assert "ends inside a frame" in r.grpc_message
    # The proxy is fine: the next call works.
    assert curl(web_proxy.url(UNARY), echo_body(), http2=http2, tmp=tmp_path).grpc_status == 0


def test_bad_http1_gets_400_and_closes_that_connection(web_proxy: WebProxy) -> None:
    bystander = RawHttp1(web_proxy.port)
    bad = RawHttp1(web_proxy.port)
    try:
        bad.send(b"POST /echo.Echo/UnaryEcho HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n")
        status, headers, _chunks = bad.read_response()
        assert status == 400 and headers["connection"] == "close"
        assert bad.closed_by_peer()
        r = bystander.web_call(web_request(UNARY, echo_body("still here", text=True)))
        assert r.messages[0].message == "still here"
    finally:
        bad.close()
        bystander.close()


def test_plain_http1_requests_are_told_what_the_port_speaks(
    web_proxy: WebProxy, tmp_path: Path
) -> None:
    get = curl(web_proxy.url("/"), b"", http2=False, method="GET", tmp=tmp_path)
    assert get.status == 405 and get.headers["allow"] == "POST, OPTIONS"
    json = curl(
        web_proxy.url(UNARY), b"{}", http2=False, content_type="application/json", tmp=tmp_path
    )
    assert json.status == 415
    body = (tmp_path / "response.bin").read_text()
    assert "gRPC-Web" in body and "application/grpc-web-text" in body


def test_browser_going_away_cancels_the_backend_stream(web_proxy: WebProxy) -> None:
    before = sum(b.cancelled_calls for b in web_proxy.backends)
    client = RawHttp1(web_proxy.port)
    client.send(
        web_request(
            STREAM, echo_body("x", count=100, text=True), headers=[("x-echo-interval-ms", "200")]
        )
    )
    status, _headers = client.sock.recv(4096).split(b"\r\n", 1)[0].split()[1], None
    assert status == b"200"
    client.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sum(b.cancelled_calls for b in web_proxy.backends) > before:
            break
        time.sleep(0.05)
    assert sum(b.cancelled_calls for b in web_proxy.backends) == before + 1


# ---------------------------------------------------------------------------- CORS


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_cors_preflight_allowed(web_proxy: WebProxy, tmp_path: Path, http2: bool) -> None:
    r = curl(
        web_proxy.url(UNARY),
        b"",
        http2=http2,
        method="OPTIONS",
        headers=[
            f"origin: {ALLOWED_ORIGIN}",
            "access-control-request-method: POST",
            "access-control-request-headers: content-type,x-grpc-web,x-pin",
        ],
        tmp=tmp_path,
    )
    assert r.status == 204
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "x-pin"} <= allowed
    assert "POST" in r.headers["access-control-allow-methods"]


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_cors_preflight_refused(web_proxy: WebProxy, tmp_path: Path, http2: bool) -> None:
    r = curl(
        web_proxy.url(UNARY),
        b"",
        http2=http2,
        method="OPTIONS",
        headers=["origin: http://evil.example", "access-control-request-method: POST"],
        tmp=tmp_path,
    )
    assert r.status == 403
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_cors_headers_on_calls(web_proxy: WebProxy, tmp_path: Path, http2: bool) -> None:
    allowed = curl(
        web_proxy.url(UNARY), echo_body(), http2=http2, headers=[f"origin: {ALLOWED_ORIGIN}"],
        tmp=tmp_path,
    )  # fmt: skip
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip() for h in allowed.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "x-backend"} <= exposed
    other = curl(
        web_proxy.url(UNARY), echo_body(), http2=http2, headers=["origin: http://evil.example"],
        tmp=tmp_path,
    )  # fmt: skip
    assert other.grpc_status == 0  # served (no browser would have sent it), but not readable
    assert "access-control-allow-origin" not in other.headers
