"""Per-connection limits: what we advertise and what we tolerate before GOAWAY(ENHANCE_YOUR_CALM).

Defaults follow the anchors: Go's x/net/http2 (max header list 1 MiB server-side, 10,000 queued
control frames), Envoy (60 KiB headers, 1,000 outbound control frames, flood counters), nginx
(128 concurrent streams). We pick values that a busy gRPC client never reaches and an attacker
reaches in well under a second. Rates are counted per second of wall time, but the clock is
only read when a counter passes its limit, so the hot path pays one addition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.core.units import KiB, MiB


@dataclass(frozen=True, slots=True)
class Limits:
    # Advertised in SETTINGS.
    max_concurrent_streams: int = 256
    stream_window: int = 256 * KiB  # also the most we buffer for one stream in one direction
    connection_window: int = 4 * MiB
    max_header_list_size: int = 64 * KiB
    max_frame_size: int = 16 * KiB  # we advertise the default and hold peers to it
    # Tolerated before the connection is closed with ENHANCE_YOUR_CALM.
    max_continuation_frames: int = 32  # per header block (CVE-2024-27316 family)
    max_pings_per_s: int = 100
    max_settings_per_s: int = 100
    max_empty_frames_per_s: int = 100  # empty DATA without END_STREAM, PRIORITY frames
    max_rapid_resets_per_s: int = 500  # streams reset by the client before any response
    max_queued_control_frames: int = 1000  # answers queued while the peer does not read

    @property
    def max_header_block_size(self) -> int:
        # The compressed block may be a little larger than the decoded list (Huffman worst
        # case); anything beyond that is an attempt to make us buffer.
        return self.max_header_list_size + 16 * KiB

    @property
    def stream_window_update_threshold(self) -> int:
        return self.stream_window // 4


class RateCounter:
    """Counts events; `hit()` is true when more than `limit` happened within one second."""

    __slots__ = ("_clock", "_count", "_limit", "_start")

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._count = 0
        self._start = clock()

    def hit(self) -> bool:
        self._count += 1
        if self._count <= self._limit:
            return False
        now = self._clock()
        if now - self._start >= 1.0:
            self._start = now
            self._count = 1
            return False
        return True
