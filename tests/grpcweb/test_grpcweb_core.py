"""The sans-I/O parts of gRPC-Web (proxy/core/grpcweb.py), without sockets."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.grpcweb import (
    BINARY,
    NATIVE,
    PREFLIGHT,
    TEXT,
    FrameChecker,
    TextDecoder,
    WebRequest,
    WebRequestError,
    WebResponse,
    cors_policy,
    native_request,
    trailer_frame,
    web_kind,
)


def _request(content_type: bytes, method: bytes = b"POST") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":path", b"/s/M"), (b"content-type", content_type)]


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        (b"application/grpc", NATIVE),
        (b"application/grpc+proto", NATIVE),
        (b"application/grpc-web", BINARY),
        (b"application/grpc-web+proto", BINARY),
        (b"application/grpc-web-text", TEXT),
        (b"application/grpc-web-text+proto", TEXT),
        (b"Application/GRPC-Web-Text", TEXT),
        (b"application/grpc-webby", NATIVE),
        (b"application/json", NATIVE),
    ],
)
def test_web_kind(content_type: bytes, kind: int) -> None:
    assert web_kind(_request(content_type)) == kind


def test_preflight_kind() -> None:
    assert web_kind([(b":method", b"OPTIONS"), (b":path", b"/s/M")]) == PREFLIGHT
    assert web_kind(_request(b"application/grpc-web", b"OPTIONS")) == PREFLIGHT
    assert web_kind(_request(b"application/grpc", b"OPTIONS")) == NATIVE


def test_native_request_headers() -> None:
    headers = [
        (b":method", b"POST"),
        (b":path", b"/s/M"),
        (b"content-type", b"application/grpc-web-text+proto"),
        (b"content-length", b"12"),
        (b"connection", b"keep-alive"),
        (b"grpc-timeout", b"1S"),
        (b"x-meta", b"v"),
    ]
    assert native_request(headers, TEXT) == [
        (b":method", b"POST"),
        (b":path", b"/s/M"),
        (b"content-type", b"application/grpc+proto"),
        (b"grpc-timeout", b"1S"),
        (b"x-meta", b"v"),
        (b"te", b"trailers"),
    ]


def test_trailer_frame() -> None:
    frame = trailer_frame([(b"grpc-status", b"0"), (b"x-a", b"b")])
    assert frame == b"\x80\x00\x00\x00\x18grpc-status: 0\r\nx-a: b\r\n"


@given(
    st.lists(st.binary(max_size=40), min_size=1, max_size=5),
    st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=30),
)
def test_text_decoder_any_cuts_and_padding_per_message(
    messages: list[bytes], cuts: list[int]
) -> None:
    """Each message base64'd on its own (padded), the whole cut anywhere: the bytes come back."""
    encoded = b"".join(base64.b64encode(m) for m in messages)
    decoder = TextDecoder()
    out = b""
    pos = 0
    for cut in cuts:
        out += decoder.decode(encoded[pos : pos + cut])
        pos += cut
    out += decoder.decode(encoded[pos:])
    decoder.finish()
    assert out == b"".join(messages)


@pytest.mark.parametrize("bad", [b"AA*A", b"A=AA", b"AAAA====", b"QQ==QQ"])
def test_text_decoder_rejects_garbage(bad: bytes) -> None:
    decoder = TextDecoder()
    with pytest.raises(WebRequestError):
        decoder.decode(bad)
        decoder.finish()


def test_frame_checker() -> None:
    ok = FrameChecker()
    body = b"\x00\x00\x00\x00\x03abc\x01\x00\x00\x00\x00"
    for byte in body:  # one byte at a time: headers split anywhere
        ok.feed(bytes([byte]))
    ok.finish()
    truncated = FrameChecker()
    truncated.feed(body[:-3])
    with pytest.raises(WebRequestError, match="ends inside a frame"):
        truncated.finish()
    with pytest.raises(WebRequestError, match="flagged 0x80"):
        FrameChecker().feed(b"\x80\x00\x00\x00\x00")


def test_request_acks_add_up_to_what_the_client_sent() -> None:
    body = base64.b64encode(b"\x00\x00\x00\x00\x64" + b"x" * 100)
    request = WebRequest(text=True)
    decoded = [request.feed(body[i : i + 7], i + 7 >= len(body)) for i in range(0, len(body), 7)]
    acked = sum(request.acked(len(d)) for d in decoded)
    assert acked == len(body)


def test_response_flushed_counts_backend_bytes() -> None:
    response = WebResponse(text=True)
    chunks = [response.data(b"a" * n) for n in (1, 5, 100)]
    trailers = response.trailers([(b"grpc-status", b"0")])
    sent = b"".join([*chunks, trailers])
    raw = 0
    for i in range(0, len(sent), 13):  # flushed in pieces that cut chunks anywhere
        raw += response.flushed(len(sent[i : i + 13]))
    assert raw == 106
    assert WebResponse(text=False).flushed(42) == 42


def test_cors_policy() -> None:
    policy = cors_policy(("https://app.example/",), ("x-pin",), ("x-backend",))
    assert policy.allows(b"https://app.example")
    assert not policy.allows(b"https://other.example")
    preflight = [(b"origin", b"https://app.example"), (b"access-control-request-method", b"POST")]
    status, headers = policy.preflight(preflight)
    assert status == 204
    assert dict(headers)[b"access-control-allow-origin"] == b"https://app.example"
    assert b"x-pin" in dict(headers)[b"access-control-allow-headers"]
    refused = [(b"origin", b"https://other.example"), (b"access-control-request-method", b"POST")]
    assert policy.preflight(refused)[0] == 403
    assert policy.response_headers(b"https://other.example") == []
    exposed = dict(policy.response_headers(b"https://app.example"))
    assert b"x-backend" in exposed[b"access-control-expose-headers"]
    assert cors_policy(("*",), (), ()).allows(b"http://anything:8080")
