"""The frame factory (proxy/core/h2/frames.py): byte layouts, checked by hand and against hyperframe
(python-hyper's independent frame parser)."""

from __future__ import annotations

import struct

import pytest
from h2harness import parse
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy.core.h2 import frames as fr


def hyper(data: bytes) -> list[Frame]:
    """Parse serialized frames with hyperframe."""
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


def test_frame_header_layout() -> None:
    raw = fr.frame(0xFA, 0x5A, 0x1234_5678, b"abc")
    assert raw == b"\x00\x00\x03" + b"\xfa" + b"\x5a" + b"\x12\x34\x56\x78" + b"abc"
    assert fr.frame_header(fr.DATA, 1, 3, 0xABCDEF) == b"\xab\xcd\xef\x00\x01\x00\x00\x00\x03"


def test_parse_header_round_trips_and_masks_the_reserved_bit() -> None:
    raw = fr.frame_header(fr.HEADERS, fr.FLAG_END_HEADERS, 0x8000_0007, 16_384)
    assert fr.parse_header(raw) == (16_384, fr.HEADERS, fr.FLAG_END_HEADERS, 7)
    assert fr.parse_header(b"xx" + raw, 2) == (16_384, fr.HEADERS, fr.FLAG_END_HEADERS, 7)
    assert fr.parse_header(fr.frame_header(fr.DATA, 0, 1, fr.MAX_MAX_FRAME_SIZE))[0] == (
        fr.MAX_MAX_FRAME_SIZE
    )


def test_preface_and_constants() -> None:
    assert fr.PREFACE == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert len(fr.PREFACE) == 24
    assert (fr.DEFAULT_WINDOW, fr.MAX_WINDOW) == (65_535, 2**31 - 1)
    assert (fr.DEFAULT_MAX_FRAME_SIZE, fr.MAX_MAX_FRAME_SIZE) == (2**14, 2**24 - 1)


@pytest.mark.parametrize("end_stream", [False, True])
def test_data(end_stream: bool) -> None:
    raw = fr.data(5, b"hello", end_stream)
    (frame,) = hyper(raw)
    assert isinstance(frame, DataFrame)
    assert (frame.stream_id, frame.data, "END_STREAM" in frame.flags) == (5, b"hello", end_stream)
    assert raw[4] == (1 if end_stream else 0)


def test_empty_data_with_end_stream() -> None:
    assert fr.data(1, b"", True) == b"\x00\x00\x00\x00\x01\x00\x00\x00\x01"


def test_small_header_block_is_one_headers_frame() -> None:
    raw = fr.headers(3, b"\x82\x86", end_stream=True)
    (frame,) = hyper(raw)
    assert isinstance(frame, HeadersFrame)
    assert frame.data == b"\x82\x86"
    assert {"END_STREAM", "END_HEADERS"} <= set(frame.flags)


@pytest.mark.parametrize(
    ("size", "max_frame", "expected"),
    [
        (100, 100, [100]),  # exactly one frame's worth: no CONTINUATION
        (101, 100, [100, 1]),
        (250, 100, [100, 100, 50]),
        (300, 100, [100, 100, 100]),  # last CONTINUATION exactly full
        (40_000, 16_384, [16_384, 16_384, 7_232]),
    ],
)
def test_large_header_block_splits_into_continuations(
    size: int, max_frame: int, expected: list[int]
) -> None:
    block = bytes(i % 251 for i in range(size))
    raw = fr.headers(7, block, end_stream=True, max_frame_size=max_frame)
    frames = hyper(raw)
    assert [len(f.data) for f in frames] == expected
    assert isinstance(frames[0], HeadersFrame)
    assert all(isinstance(f, ContinuationFrame) for f in frames[1:])
    assert all(f.stream_id == 7 for f in frames)
    # END_STREAM stays on HEADERS; END_HEADERS only on the last frame.
    assert "END_STREAM" in frames[0].flags
    assert [("END_HEADERS" in f.flags) for f in frames] == [False] * (len(expected) - 1) + [True]
    assert all("END_STREAM" not in f.flags for f in frames[1:])
    assert b"".join(f.data for f in frames) == block


def test_headers_without_end_stream() -> None:
    (frame,) = parse(fr.headers(1, b"\x82"))
    assert frame.flags == fr.FLAG_END_HEADERS


def test_rst_stream() -> None:
    raw = fr.rst_stream(9, 0xB)
    (frame,) = hyper(raw)
    assert isinstance(frame, RstStreamFrame)
    assert (frame.stream_id, frame.error_code) == (9, 0xB)
    assert len(raw) == 13


def test_settings_and_ack() -> None:
    values = {fr.SETTINGS_MAX_CONCURRENT_STREAMS: 100, fr.SETTINGS_INITIAL_WINDOW_SIZE: 2**31 - 1}
    (frame,) = hyper(fr.settings(values))
    assert isinstance(frame, SettingsFrame)
    assert frame.settings == values
    assert fr.settings({}) == b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    (ack,) = hyper(fr.SETTINGS_ACK)
    assert isinstance(ack, SettingsFrame)
    assert "ACK" in ack.flags
    assert ack.settings == {}


@pytest.mark.parametrize("ack", [False, True])
def test_ping(ack: bool) -> None:
    (frame,) = hyper(fr.ping(b"12345678", ack))
    assert isinstance(frame, PingFrame)
    assert frame.opaque_data == b"12345678"
    assert ("ACK" in frame.flags) == ack


def test_goaway() -> None:
    (frame,) = hyper(fr.goaway(0x7FFF_FFFF, 0xB, b"calm down"))
    assert isinstance(frame, GoAwayFrame)
    assert (frame.stream_id, frame.last_stream_id, frame.error_code) == (0, 2**31 - 1, 0xB)
    assert frame.additional_data == b"calm down"


def test_window_update() -> None:
    (frame,) = hyper(fr.window_update(0, 2**31 - 1))
    assert isinstance(frame, WindowUpdateFrame)
    assert (frame.stream_id, frame.window_increment) == (0, 2**31 - 1)
    assert fr.window_update(3, 1)[-4:] == struct.pack(">I", 1)


@pytest.mark.parametrize("exclusive", [False, True])
def test_priority(exclusive: bool) -> None:
    (frame,) = hyper(fr.priority(5, 3, weight=200, exclusive=exclusive))
    assert isinstance(frame, PriorityFrame)
    assert (frame.stream_id, frame.depends_on, frame.stream_weight) == (5, 3, 200)
    assert frame.exclusive == exclusive
