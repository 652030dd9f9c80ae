"""A sans-I/O HTTP/2 connection for a relay: bytes in, events out; actions in, bytes out.

Theory of operation
-------------------
`receive_data(bytes)` parses whole frames out of a buffer and returns events; frames the codec
can answer alone (SETTINGS, PING, WINDOW_UPDATE) are answered by queuing bytes, which the user
collects with `data_to_send()`. Protocol violations raise `H2ConnectionError` (the user sends
GOAWAY with `close_with_error` and closes) or, when only one stream is at fault, reset that
stream and surface a `StreamReset(remote=False)` event.

The codec is deliberately smaller than a general HTTP/2 library: no priorities, no push, no
1xx forwarding. It keeps exactly the state a relay needs:

* Flow control, both ways. Inbound, the connection window is credited as soon as bytes arrive
  (the per-stream buffers bound memory, and a stalled stream must not stall its neighbours);
  a stream's window is credited only when the user calls `ack_data` after forwarding the bytes.
  So a reader that stops stalls only its own stream, and per-stream memory is bounded by the
  stream window we advertise. Outbound, `send_data` queues per stream and writes what the
  peer's windows allow; `DataFlushed` events say when queued bytes leave, so the relay can
  credit the other side.
* HPACK with caches keyed on the table generation (`hpack_cache`).
* Abuse limits (see `Limits`): trip -> `FloodError` -> GOAWAY(ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from importlib.machinery import EXTENSION_SUFFIXES
from typing import TYPE_CHECKING, Final

from hpack import HPACKError, OversizedHeaderListError

from proxy.core.h2 import frames as fr
from proxy.core.h2.errors import (
    ErrorCode,
    FloodError,
    H2ConnectionError,
    Http1RequestError,
    TLSOnCleartextError,
)
from proxy.core.h2.events import (
    DataFlushed,
    DataReceived,
    Event,
    GoAwayReceived,
    HeaderList,
    HeadersReceived,
    PingAcked,
    SettingsChanged,
    StreamReset,
)
from proxy.core.h2.hpack_cache import CachingDecoder, CachingEncoder
from proxy.core.h2.limits import Limits, RateCounter
from proxy.core.h2.validation import validate_request, validate_response, validate_trailers

if TYPE_CHECKING:
    from proxy.core.buffers import BufferMeter

_U32 = struct.Struct(">I")
_pack_header: Final = fr.pack_header
_unpack_header: Final = fr._HEADER.unpack_from
# Whether this module runs compiled by mypyc (its file is then the extension module, by the
# rule proxy.build_info applies to every data-path module): a few hot spots take the form that
# is cheaper for the build that runs.
_COMPILED: Final = __file__.endswith(tuple(EXTENSION_SUFFIXES))
_PLAIN_HEADERS_MASK = fr.FLAG_END_HEADERS | fr.FLAG_PADDED | fr.FLAG_PRIORITY
_END_HEADERS_STREAM = fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM
_U32X2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
# DATA payloads this big are queued apart from their frame header, not copied behind it: the
# output is joined once (data_to_send) or written where it lies (take_output, a writev).
_GATHER_MIN: Final = 4096

_HTTP1_METHODS: Final = (
    b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ",
    b"TRACE ",
)  # fmt: skip
_RECENTLY_CLOSED_MAX: Final = 1024
_VALID_REQUESTS_MAX: Final = 64  # request header lists remembered as valid, per connection
_UNLIMITED: Final = 1 << 62


def _decode_error(exc: Exception) -> H2ConnectionError:
    if isinstance(exc, OversizedHeaderListError):
        return FloodError("header_list_size", f"header list too large: {exc}")
    # HPACKError, or hpack's IndexError/ValueError/TypeError on garbage.
    return H2ConnectionError(ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}")


class Role(Enum):
    SERVER = "server"  # faces gRPC clients: the peer opens streams
    CLIENT = "client"  # faces a backend: we open streams


class Closed(Enum):
    """How a stream that is gone ended, which decides what a late frame on it means."""

    BY_END_STREAM = 1
    RESET_BY_US = 2  # frames in flight are expected and ignored (RFC 9113 5.4.2)
    RESET_BY_PEER = 3


class Stream:
    # A plain class, not a dataclass: compiled, a dataclass's generated __init__ would run as
    # interpreted bytecode for each of the two streams of every call (events.py says more).
    __slots__ = (
        "expected_length",
        "headers_received",
        "headers_sent",
        "local_closed",
        "pending",
        "pending_end",
        "pending_len",
        "pending_trailers",
        "received_length",
        "recv_window",
        "remote_closed",
        "send_window",
        "sent_data",
        "stream_id",
        "unacked",
        "waiting",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0  # forwarded bytes not yet returned to the peer with WINDOW_UPDATE
        self.pending: deque[bytes] | None = None
        self.pending_len = 0
        self.pending_end = False
        self.pending_trailers: HeaderList | None = None
        self.local_closed = False
        self.remote_closed = False
        self.headers_received = 0
        self.headers_sent = False
        self.expected_length = -1  # content-length of the request, checked against DATA
        self.received_length = 0
        self.sent_data = False  # any DATA written yet (a new stream's first frame goes first)
        self.waiting = False  # in Connection._fresh or Connection._waiting


class Connection:
    def __init__(
        self,
        role: Role,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        meter: BufferMeter | None = None,
    ) -> None:
        self.role = role
        # DATA queued in the stream queues, waiting for the peer's windows: on this connection,
        # and summed over the process in `meter` (see proxy.core.buffers).
        self.queued = 0
        self._meter = meter
        self.limits = limits or Limits()
        lim = self.limits
        self.streams: dict[int, Stream] = {}
        # The stream of the last lookup (see _stream).
        self._last: Stream | None = None
        # How streams closed lately, in two generations (see _remember_closed).
        self._recently_closed: dict[int, Closed] = {}
        self._closed_before: dict[int, Closed] = {}
        self._out: list[bytes] = []
        # Whether `_out` holds a payload queued apart from its header (_GATHER_MIN).
        self.gathered = False
        self._inbuf = b""
        self._preface_pending = role is Role.SERVER
        self._settings_seen = False

        self._decoder = CachingDecoder(lim.max_header_list_size)
        self._encoder = CachingEncoder()
        # Request lists found valid, by identity (see _open_remote_stream), with their length.
        self._valid_requests: dict[int, tuple[HeaderList, int]] = {}
        self._last_valid_trailers: HeaderList | None = None

        # What the peer lets us send.
        self.remote_max_concurrent_streams = 1 << 31
        self.remote_settings_seen = False
        self._remote_initial_window = fr.DEFAULT_WINDOW
        self._remote_max_frame_size = fr.DEFAULT_MAX_FRAME_SIZE
        self._send_conn_window = fr.DEFAULT_WINDOW
        # What we let the peer send.
        self._recv_conn_window = lim.connection_window
        self._conn_unacked = 0
        # Precomputed: read on every DATA frame.
        self._conn_update_at = lim.connection_window >> 1
        self._stream_update_at = lim.stream_window_update_threshold

        self.highest_peer_stream_id = 0
        self._next_stream_id = 1
        self.goaway_received: int | None = None  # last stream id from the peer's GOAWAY
        self.goaway_sent: int | None = None
        self._cont_stream_id = 0  # stream of the header block being continued, or 0
        self._cont_flags = 0
        self._cont_parts: list[bytes] = []
        self._cont_count = 0
        self._cont_bad_priority = False

        self._write_paused = False
        self._queued_control = 0
        # Streams with DATA the connection holds back (its window spent, or the transport
        # paused), in the order they get the window back: round-robin, a frame per turn, a new
        # stream's first frame first. One stream's backlog must not starve the others sharing
        # the connection (a small call queued behind megabytes of other calls' uploads waited
        # for all of them when this was the streams' dict order).
        self._fresh: deque[Stream] = deque()  # those that have sent no DATA yet: served first
        self._waiting: deque[Stream] = deque()
        self._waiting_closed = 0  # closed streams still queued (dropped when popped)
        # Flood counters guard us from clients. A backend is ours to trust: tripping there
        # would kill every stream it carries for every client, so its limits are off.
        guard = role is Role.SERVER
        self._pings = RateCounter(lim.max_pings_per_s if guard else _UNLIMITED, clock)
        self._settings = RateCounter(lim.max_settings_per_s if guard else _UNLIMITED, clock)
        self._empty = RateCounter(lim.max_empty_frames_per_s if guard else _UNLIMITED, clock)
        self._resets = RateCounter(lim.max_rapid_resets_per_s if guard else _UNLIMITED, clock)
        # PINGs since we last sent HEADERS or DATA. gRPC's BDP estimator pings on every burst
        # of data it receives, thousands a second on a busy connection; only pings that come
        # with no traffic from us are a flood (the rule grpc servers enforce as ping strikes).
        self._pings_since_data = 0

        if role is Role.CLIENT:
            self._start()
        # A server sends its SETTINGS once the client's preface has arrived: before that, the
        # peer may be an HTTP/1 client, which must get a plain HTTP/1.1 answer, not frames.

    # ------------------------------------------------------------------ start and output

    def _start(self) -> None:
        lim = self.limits
        settings = {
            fr.SETTINGS_MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
            fr.SETTINGS_INITIAL_WINDOW_SIZE: lim.stream_window,
            fr.SETTINGS_MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        if self.role is Role.CLIENT:
            settings[fr.SETTINGS_ENABLE_PUSH] = 0
            self._out.append(fr.PREFACE)
        self._out.append(fr.settings(settings))
        if lim.connection_window > fr.DEFAULT_WINDOW:
            self._out.append(fr.window_update(0, lim.connection_window - fr.DEFAULT_WINDOW))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        self.gathered = False
        return out[0] if len(out) == 1 else b"".join(out)

    def take_output(self) -> list[bytes]:
        """The output as queued, for a transport that gathers (writelines: one writev), so
        that big payloads are not copied into one buffer first."""
        out = self._out
        self._out = []
        self.gathered = False
        return out

    def _append_data(self, sid: int, data: bytes, end_stream: bool) -> None:
        n = len(data)
        header = _pack_header((n << 8) | fr.DATA, fr.FLAG_END_STREAM if end_stream else 0, sid)
        if n < _GATHER_MIN:
            self._out.append(header + data)
        else:
            self._out.append(header)
            self._out.append(data)
            self.gathered = True

    def _send_control(self, frame: bytes) -> None:
        """Queue a frame the peer made us send; counted while the peer is not reading, so a
        peer that floods PINGs or SETTINGS without reading cannot grow our memory."""
        if self._write_paused:
            self._queued_control += 1
            if self._queued_control > self.limits.max_queued_control_frames:
                raise FloodError(
                    "queued_control_frames",
                    f"more than {self.limits.max_queued_control_frames} control frames queued "
                    "for a peer that does not read",
                )
        self._out.append(frame)

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what arrived; return the events. Raises H2ConnectionError."""
        events: list[Event] = []
        inbuf = self._inbuf
        pos = 0
        if not inbuf:
            buf = data
        elif self._preface_pending or len(inbuf) < 9:
            buf = inbuf + data
        else:
            # The last read ended inside a frame: complete that frame, then parse the rest of
            # this read where it lies. Joining the whole read to the leftover (up to 256 KiB
            # behind 16 KiB) copied every byte of a stream of big frames once more.
            need = 9 + ((inbuf[0] << 16) | (inbuf[1] << 8) | inbuf[2]) - len(inbuf)
            if need < len(data):
                self._inbuf = b""
                self._parse_frames(inbuf + data[:need], 0, events)
                buf = data
                pos = need
            else:
                buf = inbuf + data
        if self._preface_pending:
            buf = self._check_preface(buf)
            if self._preface_pending:
                self._inbuf = buf
                return []
        self._parse_frames(buf, pos, events)
        return events

    def _parse_frames(self, buf: bytes, pos: int, events: list[Event]) -> None:
        """The frames of `buf` from `pos`; what is left of an incomplete frame waits in
        `_inbuf` for the next read."""
        max_size = self.limits.max_frame_size
        end = len(buf)
        # Declared so that mypyc keeps the fields as C integers: left as unpack's Any, every
        # shift, mask and comparison below was a generic Python operation (about 2,000
        # instructions per frame, 7 frames per serial call).
        word: int
        flags: int
        stream_id: int
        while end - pos >= 9:
            if _COMPILED:
                # Compiled, indexing bytes is a C load: cheaper than a call into struct (about
                # 650 instructions a frame). Interpreted, the one call is the cheaper way.
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                kind = buf[pos + 3]
                flags = buf[pos + 4]
                stream_id = (
                    ((buf[pos + 5] & 0x7F) << 24)
                    | (buf[pos + 6] << 16)
                    | (buf[pos + 7] << 8)
                    | buf[pos + 8]
                )
            else:
                word, flags, stream_id = _unpack_header(buf, pos)
                length = word >> 8
                kind = word & 0xFF
                stream_id &= 0x7FFF_FFFF
            if length > max_size:
                raise H2ConnectionError(
                    ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_size}"
                )
            if end - pos - 9 < length:
                break
            payload = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if self._cont_stream_id and kind != fr.CONTINUATION:
                raise H2ConnectionError(
                    ErrorCode.PROTOCOL_ERROR, "header block interrupted by another frame"
                )
            if not self._settings_seen:
                if kind != fr.SETTINGS or flags & fr.FLAG_ACK:
                    raise H2ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS"
                    )
                self._settings_seen = True
            # A chain of comparisons, the common frames first, rather than a table of bound
            # methods: compiled, each of these is a direct C call, and a table's entries are
            # Python calls (arguments boxed, parsed again on the way in).
            if kind == fr.DATA:
                self._receive_data_frame(flags, stream_id, payload, events)
            elif kind == fr.HEADERS:
                self._receive_headers_frame(flags, stream_id, payload, events)
            elif kind == fr.WINDOW_UPDATE:
                self._receive_window_update_frame(flags, stream_id, payload, events)
            elif kind == fr.PING:
                self._receive_ping_frame(flags, stream_id, payload, events)
            elif kind == fr.SETTINGS:
                self._receive_settings_frame(flags, stream_id, payload, events)
            elif kind == fr.RST_STREAM:
                self._receive_rst_stream_frame(flags, stream_id, payload, events)
            elif kind == fr.CONTINUATION:
                self._receive_continuation_frame(flags, stream_id, payload, events)
            elif kind == fr.GOAWAY:
                self._receive_goaway_frame(flags, stream_id, payload, events)
            elif kind == fr.PRIORITY:
                self._receive_priority_frame(flags, stream_id, payload, events)
            elif kind == fr.PUSH_PROMISE:
                self._receive_push_promise_frame(flags, stream_id, payload, events)
            # Unknown frame types are ignored (RFC 9113 4.1, 5.5).
        self._inbuf = buf[pos:] if pos < end else b""

    def _check_preface(self, buf: bytes) -> bytes:
        n = min(len(buf), len(fr.PREFACE))
        if buf[:n] != fr.PREFACE[:n]:
            if buf[:2] == b"\x16\x03":  # a TLS handshake record (TLS 1.x)
                raise TLSOnCleartextError()
            for method in _HTTP1_METHODS:
                if buf.startswith(method):
                    raise Http1RequestError(buf)
                if method.startswith(buf):
                    return buf  # could still be an HTTP/1 request line: wait for more
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
        if n < len(fr.PREFACE):
            return buf
        self._preface_pending = False
        self._start()
        return buf[len(fr.PREFACE) :]

    # ------------------------------------------------------------------ frame handlers

    def _receive_data_frame(self, flags: int, sid: int, payload: bytes, ev: list[Event]) -> None:
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flow_len = len(payload)
        if flags & fr.FLAG_PADDED:
            if not payload or payload[0] >= flow_len:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA padding too long")
            payload = payload[1 : flow_len - payload[0]]
        # The connection window is credited on arrival: see the module docstring.
        self._recv_conn_window -= flow_len
        if self._recv_conn_window < 0:
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._conn_unacked += flow_len
        if self._conn_unacked >= self._conn_update_at:
            self._out.append(fr.window_update(0, self._conn_unacked))
            self._recv_conn_window += self._conn_unacked
            self._conn_unacked = 0
        end_stream = bool(flags & fr.FLAG_END_STREAM)
        if not payload and not end_stream and self._empty.hit():
            raise FloodError("empty_frames", "too many empty DATA frames")
        st = self._stream(sid)
        if st is None:
            if self._stream_is_idle(sid):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if self._closed_how(sid) is not Closed.RESET_BY_US:
                self._reset(sid, ErrorCode.STREAM_CLOSED, ev)
            return
        if st.remote_closed:
            self._reset(sid, ErrorCode.STREAM_CLOSED, ev)
            return
        st.recv_window -= flow_len
        if st.recv_window < 0:
            self._reset(sid, ErrorCode.FLOW_CONTROL_ERROR, ev)
            return
        st.unacked += flow_len - len(payload)  # padding is ours to return at once
        if st.expected_length >= 0:
            st.received_length += len(payload)
            if st.received_length > st.expected_length or (
                end_stream and st.received_length != st.expected_length
            ):
                self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)
                return
        if end_stream:
            st.remote_closed = True
            if st.local_closed:
                self._close(st, Closed.BY_END_STREAM)
        ev.append(DataReceived(sid, payload, end_stream))

    def _receive_headers_frame(self, flags: int, sid: int, payload: bytes, ev: list[Event]) -> None:
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & _PLAIN_HEADERS_MASK == fr.FLAG_END_HEADERS:
            # One frame, no padding or priority: what every gRPC peer sends.
            self._receive_header_block(sid, flags, payload, False, ev)
            return
        start, stop = 0, len(payload)
        pad = 0
        if flags & fr.FLAG_PADDED:
            if not payload:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
            pad = payload[0]
            start = 1
        bad_priority = False
        if flags & fr.FLAG_PRIORITY:
            if stop - start < 5:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
            bad_priority = (_U32.unpack_from(payload, start)[0] & 0x7FFF_FFFF) == sid
            start += 5
        stop -= pad
        if stop < start:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding too long")
        fragment = payload[start:stop]
        if not flags & fr.FLAG_END_HEADERS:
            self._cont_stream_id = sid
            self._cont_flags = flags
            self._cont_parts = [fragment]
            self._cont_count = 0
            self._cont_bad_priority = bad_priority
            return
        self._receive_header_block(sid, flags, fragment, bad_priority, ev)

    def _receive_continuation_frame(
        self, flags: int, sid: int, payload: bytes, ev: list[Event]
    ) -> None:
        if not self._cont_stream_id or sid != self._cont_stream_id:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._cont_count += 1
        self._cont_parts.append(payload)
        if self._cont_count > self.limits.max_continuation_frames:
            raise FloodError(
                "continuation_frames",
                f"more than {self.limits.max_continuation_frames} CONTINUATION frames",
            )
        if sum(len(p) for p in self._cont_parts) > self.limits.max_header_block_size:
            raise FloodError("header_list_size", "header block too large")
        if flags & fr.FLAG_END_HEADERS:
            block = b"".join(self._cont_parts)
            self._cont_stream_id = 0
            self._cont_parts = []
            self._receive_header_block(sid, self._cont_flags, block, self._cont_bad_priority, ev)

    def _receive_header_block(
        self, sid: int, flags: int, block: bytes, bad_priority: bool, ev: list[Event]
    ) -> None:
        # Decode first, whatever happens to the stream: the HPACK tables must stay in step.
        try:
            headers = self._decoder.decode(block)
        except (HPACKError, IndexError, ValueError, TypeError) as exc:
            raise _decode_error(exc) from exc
        end_stream = bool(flags & fr.FLAG_END_STREAM)
        st = self._stream(sid)
        if st is None:
            if self.role is Role.SERVER and sid > self.highest_peer_stream_id:
                self._open_remote_stream(sid, headers, end_stream, bad_priority, ev)
                return
            if self._stream_is_idle(sid):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
            closed = self._closed_how(sid)
            if closed is Closed.RESET_BY_US:
                return
            if closed is Closed.RESET_BY_PEER:
                self._reset(sid, ErrorCode.STREAM_CLOSED, ev)
                return
            raise H2ConnectionError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        if bad_priority:
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)
            return
        if st.remote_closed:
            self._reset(sid, ErrorCode.STREAM_CLOSED, ev)
            return
        if self.role is Role.CLIENT and st.headers_received == 0:
            status = headers[0][1] if headers and headers[0][0] == b":status" else b""
            if status.startswith(b"1") and len(status) == 3 and not end_stream:
                return  # informational response: gRPC has none, and we do not forward them
            if validate_response(headers) is not None:
                self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)
                return
            st.headers_received = 1
            if end_stream:
                self._remote_end(st)
            ev.append(HeadersReceived(sid, headers, end_stream, False))
            return
        # A second block is trailers: it must end the stream and carry no pseudo-headers.
        # (The decoder hands out the same list for a repeated block: validated once.)
        if not end_stream or (
            headers is not self._last_valid_trailers and validate_trailers(headers) is not None
        ):
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)
            return
        if st.expected_length >= 0 and st.received_length != st.expected_length:
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)
            return
        self._last_valid_trailers = headers
        st.headers_received = 2
        self._remote_end(st)
        ev.append(HeadersReceived(sid, headers, True, True))

    def _open_remote_stream(
        self, sid: int, headers: HeaderList, end_stream: bool, bad_priority: bool, ev: list[Event]
    ) -> None:
        if not sid & 1:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"client opened even stream {sid}")
        self.highest_peer_stream_id = sid
        if self.goaway_sent is not None and sid > self.goaway_sent:
            # Above our GOAWAY's last id: never processed. RFC 9113 6.8 lets us drop it (as
            # grpc-go and nghttp2 do), but saying so with REFUSED_STREAM also reaches a client
            # that watches its stream rather than the GOAWAY; either way it may retry elsewhere.
            self._reset(sid, ErrorCode.REFUSED_STREAM, ev, surface=False)
            return
        if bad_priority:
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev, surface=False)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._reset(sid, ErrorCode.REFUSED_STREAM, ev, surface=False)
            return
        # The decoder returns the very same list for a block it has cached (a client repeating
        # its request headers), so an identity check spares validating it again. Several are
        # kept: a client that sends grpc-timeout alternates between a few blocks (its streams
        # took their deadlines in different milliseconds). Holding the references keeps the
        # lists alive, so their identities cannot be reused by others.
        expected: int | None
        valid = self._valid_requests.get(id(headers))
        if valid is not None and valid[0] is headers:
            expected = valid[1]
        else:
            expected = validate_request(headers)
            if expected is not None:
                if len(self._valid_requests) >= _VALID_REQUESTS_MAX:
                    self._valid_requests.clear()
                self._valid_requests[id(headers)] = (headers, expected)
        if expected is None:
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev, surface=False)
            return
        st = Stream(sid, self._remote_initial_window, self.limits.stream_window)
        st.headers_received = 1
        st.expected_length = expected
        if end_stream:
            st.remote_closed = True
            if expected > 0:
                self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev, surface=False)
                return
        self.streams[sid] = st
        self._last = st
        ev.append(HeadersReceived(sid, headers, end_stream, False))

    def _receive_priority_frame(
        self, flags: int, sid: int, payload: bytes, ev: list[Event]
    ) -> None:
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        # Counted before any answer, so malformed ones cannot dodge the limit.
        if self._empty.hit():
            raise FloodError("empty_frames", "too many PRIORITY frames")
        if len(payload) != 5:
            self._reset(sid, ErrorCode.FRAME_SIZE_ERROR, ev)
            return
        if (_U32.unpack_from(payload)[0] & 0x7FFF_FFFF) == sid:
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)

    def _receive_rst_stream_frame(
        self, flags: int, sid: int, payload: bytes, ev: list[Event]
    ) -> None:
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length must be 4")
        st = self._stream(sid)
        if st is None:
            if self._stream_is_idle(sid):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle {sid}")
            return  # closed: a race the RFC tells us to ignore
        code = _U32.unpack(payload)[0]
        # Rapid reset (CVE-2023-44487): a stream opened and reset before we answered costs us
        # a backend call and the client nothing.
        if self.role is Role.SERVER and not st.headers_sent and self._resets.hit():
            raise FloodError("rapid_reset", "too many streams reset before their response")
        self._close(st, Closed.RESET_BY_PEER)
        ev.append(StreamReset(sid, code, True))

    def _receive_settings_frame(
        self, flags: int, sid: int, payload: bytes, ev: list[Event]
    ) -> None:
        if sid != 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & fr.FLAG_ACK:
            if payload:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not 6n")
        if self._settings.hit():
            raise FloodError("settings", "too many SETTINGS frames")
        old_max_streams = self.remote_max_concurrent_streams
        window_delta = 0
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == fr.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.set_max_table_size(value)
            elif key == fr.SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            elif key == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW:
                    raise H2ConnectionError(
                        ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large"
                    )
                window_delta += value - self._remote_initial_window
                self._remote_initial_window = value
            elif key == fr.SETTINGS_MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_MAX_FRAME_SIZE:
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE invalid")
                self._remote_max_frame_size = value
        if window_delta:
            for st in self.streams.values():
                st.send_window += window_delta
                if st.send_window > fr.MAX_WINDOW:
                    raise H2ConnectionError(
                        ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS overflowed a stream window"
                    )
        self._send_control(fr.SETTINGS_ACK)
        if window_delta > 0:
            for st in self.streams.values():
                if st.pending_len and st.send_window > 0:
                    self._hold(st)
            self._flush_all(ev)
        # A client reports the first SETTINGS always: it waits for it to learn the peer's
        # stream limit before opening streams (as grpc-go does).
        first = not self.remote_settings_seen and self.role is Role.CLIENT
        self.remote_settings_seen = True
        if first or self.remote_max_concurrent_streams != old_max_streams:
            ev.append(SettingsChanged(self.remote_max_concurrent_streams))

    def _receive_push_promise_frame(
        self, flags: int, sid: int, payload: bytes, ev: list[Event]
    ) -> None:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE is not allowed")

    def _receive_ping_frame(self, flags: int, sid: int, payload: bytes, ev: list[Event]) -> None:
        if sid != 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING length must be 8")
        if flags & fr.FLAG_ACK:
            ev.append(PingAcked(payload))
            return
        self._pings_since_data += 1
        if self._pings_since_data > self.limits.max_pings_per_s and self._pings.hit():
            raise FloodError("ping", "too many PING frames without traffic")
        self._send_control(fr.ping(payload, ack=True))

    def _receive_goaway_frame(self, flags: int, sid: int, payload: bytes, ev: list[Event]) -> None:
        if sid != 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
        last, code = _U32X2.unpack_from(payload)
        last &= 0x7FFF_FFFF
        self.goaway_received = last
        ev.append(GoAwayReceived(last, code, payload[8:]))

    def _receive_window_update_frame(
        self, flags: int, sid: int, payload: bytes, ev: list[Event]
    ) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length must be 4")
        increment: int = _U32.unpack(payload)[0]  # a C integer when compiled (see receive_data)
        increment &= 0x7FFF_FFFF
        if sid == 0:
            if increment == 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_conn_window += increment
            if self._send_conn_window > fr.MAX_WINDOW:
                raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window > 2^31-1")
            self._flush_all(ev)
            return
        st = self._stream(sid)
        if st is None:
            if self._stream_is_idle(sid):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle {sid}")
            return
        if increment == 0:
            self._reset(sid, ErrorCode.PROTOCOL_ERROR, ev)
            return
        st.send_window += increment
        if st.send_window > fr.MAX_WINDOW:
            self._reset(sid, ErrorCode.FLOW_CONTROL_ERROR, ev)
            return
        if st.pending_len:
            if self._write_paused:
                self._hold(st)
            else:
                flushed = self._flush_stream(st)
                if flushed:
                    ev.append(DataFlushed(sid, flushed))

    # ------------------------------------------------------------------ stream bookkeeping

    def _stream(self, sid: int) -> Stream | None:
        """`streams.get(sid)`, remembering the last stream found. Most lookups in a row are
        for one stream (its HEADERS, its DATA, the answer, the window acknowledgement), and a
        dict lookup by stream id is dear compiled: the id is boxed into a new int object, which
        the dict then compares with its key by value (about 280 instructions, some 25 times a
        call). The check here is two C integer compares."""
        st = self._last
        if st is not None and st.stream_id == sid:
            return st
        st = self.streams.get(sid)
        if st is not None:
            self._last = st
        return st

    def _stream_is_idle(self, sid: int) -> bool:
        if self.role is Role.SERVER:
            return sid > self.highest_peer_stream_id if sid & 1 else True
        return sid >= self._next_stream_id if sid & 1 else True

    def _remote_end(self, st: Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            self._close(st, Closed.BY_END_STREAM)

    def _close(self, st: Stream, how: Closed) -> None:
        sid = st.stream_id
        # `del`, not `pop(sid, None)`: compiled, pop with a default is a Python method call
        # (and contextlib.suppress a Python context manager).
        try:  # noqa: SIM105
            del self.streams[sid]
        except KeyError:  # closed already: nothing to take out
            pass
        if self._last is st:
            self._last = None
        if st.pending_len:  # reset with data queued: it will never be sent
            self._drop_queued(st)
        if st.waiting:
            self._waiting_closed += 1
            queued = len(self._fresh) + len(self._waiting)
            if self._waiting_closed > 64 and self._waiting_closed * 2 > queued:
                # A peer that gives no window while streams are reset must not grow the queues.
                self._fresh = self._live(self._fresh)
                self._waiting = self._live(self._waiting)
                self._waiting_closed = 0
        self._remember_closed(sid, how)

    def _live(self, queue: deque[Stream]) -> deque[Stream]:
        live: deque[Stream] = deque()
        for st in queue:
            if self.streams.get(st.stream_id) is st:
                live.append(st)
            else:
                st.waiting = False
        return live

    def _remember_closed(self, sid: int, how: Closed) -> None:
        """Bounded in two generations of half the bound each: when the newer is full it
        becomes the older one, and the older one's streams are forgotten (a stream that old
        is treated as closed). No walk over entries: evicting the oldest 128 one by one cost
        some 700 instructions a stream, a tenth of a closed stream's whole cost."""
        rc = self._recently_closed
        rc[sid] = how
        if len(rc) >= _RECENTLY_CLOSED_MAX // 2:
            self._closed_before = rc
            self._recently_closed = {}

    def _closed_how(self, sid: int) -> Closed | None:
        how = self._recently_closed.get(sid)
        return how if how is not None else self._closed_before.get(sid)

    def _reset(self, sid: int, code: ErrorCode, ev: list[Event], surface: bool = True) -> None:
        """A stream error: RST_STREAM to the peer, and an event so the user lets go too."""
        self._send_control(fr.rst_stream(sid, code))
        st = self._stream(sid)
        if st is not None:
            self._close(st, Closed.RESET_BY_US)
            if surface:
                ev.append(StreamReset(sid, code, False))
        elif self._closed_how(sid) is None:
            self._remember_closed(sid, Closed.RESET_BY_US)

    # ------------------------------------------------------------------ actions

    def open_stream(self, headers: HeaderList, end_stream: bool) -> int:
        """Client role: start a request; returns its stream id."""
        sid = self._next_stream_id
        self._next_stream_id += 2
        st = Stream(sid, self._remote_initial_window, self.limits.stream_window)
        self.streams[sid] = st
        self._last = st
        st.headers_sent = True
        st.local_closed = end_stream
        self._pings_since_data = 0
        self._write_headers(sid, self._encoder.encode(headers), end_stream)
        return sid

    @property
    def can_open_stream(self) -> bool:
        return (
            self.goaway_received is None
            and self.goaway_sent is None
            and len(self.streams) < self.remote_max_concurrent_streams
            and self._next_stream_id < fr.STREAM_ID_MASK
        )

    def is_open(self, sid: int) -> bool:
        """Whether stream `sid` is open (either side)."""
        return self._stream(sid) is not None

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    def send_headers(self, sid: int, headers: HeaderList, end_stream: bool) -> None:
        """Response headers or trailers (or request trailers in the client role). Trailers
        queued behind data that flow control holds back are sent when that data is."""
        st = self._stream(sid)
        if st is None or st.local_closed:
            return  # the stream is gone: nothing to say on it
        st.headers_sent = True
        self._pings_since_data = 0
        if st.pending_len:
            st.pending_trailers = headers
            st.pending_end = True
            return
        self._write_headers(sid, self._encoder.encode(headers), end_stream)
        if end_stream:
            self._local_end(st)

    def _write_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        n = len(block)
        if n <= self._remote_max_frame_size:  # one frame: skip the general serializer
            flags = _END_HEADERS_STREAM if end_stream else fr.FLAG_END_HEADERS
            self._out.append(_pack_header((n << 8) | fr.HEADERS, flags, sid) + block)
        else:
            self._out.append(fr.headers(sid, block, end_stream, self._remote_max_frame_size))

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> int:
        """Queue data; write what the windows allow. Returns the bytes of this stream's queue
        written now (the rest follows in DataFlushed events)."""
        st = self._stream(sid)
        if st is None or st.local_closed:
            return 0
        n = len(data)
        if (
            not st.pending_len
            and not self._write_paused
            and n <= st.send_window
            and n <= self._send_conn_window
            and n <= self._remote_max_frame_size
        ):
            # Nothing queued and the windows allow it (the usual case): one frame, no queue.
            if n:
                st.send_window -= n
                self._send_conn_window -= n
                self._pings_since_data = 0
                st.sent_data = True
            elif not end_stream:
                return 0
            self._append_data(sid, data, end_stream)
            if end_stream:
                self._local_end(st)
            return n
        if data:
            if st.pending is None:
                st.pending = deque()
            st.pending.append(data)
            st.pending_len += n
            self.queued += n
            if self._meter is not None:
                self._meter.queued += n
        if end_stream:
            st.pending_end = True
        if self._write_paused and st.pending_len:
            self._hold(st)
            sent = 0
        else:
            # (Paused with nothing but the end to send: END_STREAM is not flow-controlled and
            # goes out now, as HEADERS do.)
            sent = self._flush_stream(st)
        meter = self._meter
        # Bytes left queued over the budget (the base windows of streams opened before it
        # filled) shed at this loop turn's end, not at the next sweep.
        if (
            st.pending_len
            and meter is not None
            and meter.on_over is not None
            and meter.queued + meter.granted > meter.budget
        ):
            meter.on_over()
        return sent

    def _hold(self, st: Stream) -> None:
        """`st` has DATA the connection holds back: it waits its turn in `_flush_all`."""
        if st.waiting:
            return
        st.waiting = True
        if st.sent_data:
            self._waiting.append(st)
        else:
            self._fresh.append(st)

    def _flush_stream(self, st: Stream, quantum: int = fr.MAX_WINDOW) -> int:
        """Write `st`'s queue as the windows allow, and at least one frame but no more than
        `quantum` bytes; held back by the connection, the stream waits its turn (`_hold`)."""
        sent = 0
        pending = st.pending
        while st.pending_len:
            window = min(st.send_window, self._send_conn_window)
            if window <= 0 or sent >= quantum:
                if st.send_window > 0:  # not its own window: the connection's, or its turn
                    self._hold(st)
                return sent
            assert pending is not None
            chunk = pending.popleft()
            n = min(len(chunk), window, self._remote_max_frame_size)
            if n < len(chunk):
                pending.appendleft(chunk[n:])
                chunk = chunk[:n]
            st.pending_len -= n
            st.send_window -= n
            self._send_conn_window -= n
            sent += n
            self.queued -= n
            if self._meter is not None:
                self._meter.queued -= n
            self._pings_since_data = 0
            st.sent_data = True
            last = not st.pending_len and st.pending_end and st.pending_trailers is None
            self._append_data(st.stream_id, chunk, last)
            if last:
                self._local_end(st)
                return sent
        if st.pending_end:
            trailers = st.pending_trailers
            if trailers is not None:
                st.pending_trailers = None
                block = self._encoder.encode(trailers)
                self._out.append(fr.headers(st.stream_id, block, True, self._remote_max_frame_size))
            else:
                self._out.append(fr.data(st.stream_id, b"", True))
            self._local_end(st)
        return sent

    def _flush_all(self, ev: list[Event]) -> None:
        """The connection's window grew or its transport resumed: the waiting streams take
        turns, a frame each, until the window is spent."""
        if self._write_paused:
            return
        fresh = self._fresh
        waiting = self._waiting
        quantum = self._remote_max_frame_size
        while (fresh or waiting) and self._send_conn_window > 0:
            st = fresh.popleft() if fresh else waiting.popleft()
            st.waiting = False
            if self.streams.get(st.stream_id) is not st:
                self._waiting_closed -= 1
                continue
            if st.pending_len:
                flushed = self._flush_stream(st, quantum)
                if flushed:
                    ev.append(DataFlushed(st.stream_id, flushed))

    def _local_end(self, st: Stream) -> None:
        st.local_closed = True
        st.pending_end = False
        if st.remote_closed:
            self._close(st, Closed.BY_END_STREAM)

    def pending_bytes(self, sid: int) -> int:
        st = self._stream(sid)
        return st.pending_len if st is not None else 0

    def ack_data(self, sid: int, length: int) -> None:
        """The user forwarded `length` bytes of this stream: let the peer send that much more."""
        st = self._stream(sid)
        if st is None or st.remote_closed:
            return
        st.unacked += length
        if st.unacked >= self._stream_update_at:
            self._out.append(fr.window_update(sid, st.unacked))
            st.recv_window += st.unacked
            st.unacked = 0

    def _drop_queued(self, st: Stream) -> None:
        self.queued -= st.pending_len
        if self._meter is not None:
            self._meter.queued -= st.pending_len
        st.pending_len = 0
        st.pending = None

    def discard_queued(self) -> None:
        """The connection is gone: what its queues held is freed (and no longer counted)."""
        for st in self.streams.values():
            if st.pending_len:
                self._drop_queued(st)
        self._fresh.clear()
        self._waiting.clear()
        self._waiting_closed = 0

    def grant(self, sid: int, length: int) -> None:
        """Let the peer send `length` more bytes on this stream now, beyond what it was
        acknowledged: a window larger than the initial one (see proxy.core.buffers)."""
        st = self._stream(sid)
        if st is None or st.remote_closed or length <= 0:
            return
        self._out.append(fr.window_update(sid, length))
        st.recv_window += length

    def reset_stream(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        st = self._stream(sid)
        if st is None:
            return
        self._out.append(fr.rst_stream(sid, code))
        self._close(st, Closed.RESET_BY_US)

    def ping(self, opaque: bytes) -> None:
        self._out.append(fr.ping(opaque))

    def goaway(self, code: int = ErrorCode.NO_ERROR, last_stream_id: int | None = None,
               debug: bytes = b"") -> None:  # fmt: skip
        last = self.highest_peer_stream_id if last_stream_id is None else last_stream_id
        self.goaway_sent = last
        self._out.append(fr.goaway(last, code, debug))

    def close_with_error(self, exc: H2ConnectionError) -> bytes:
        """The bytes to write before closing: GOAWAY with the error's code and reason."""
        self._out.append(
            fr.goaway(self.highest_peer_stream_id, exc.code, exc.message.encode()[:256])
        )
        return self.data_to_send()

    # ------------------------------------------------------------------ transport backpressure

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> list[Event]:
        self._write_paused = False
        self._queued_control = 0
        ev: list[Event] = []
        self._flush_all(ev)
        return ev
