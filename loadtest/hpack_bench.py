"""Decoding a header block the cache has not seen: hpack's decoder against the proxy's.

A grpc-go client sends a new ``grpc-timeout`` on most calls, so its request blocks miss the
proxy's block cache: each is decoded (by the lean path of ``proxy.core.h2.hpack_cache``, or by hpack
when that gives up) and validated. This times both decoders on the same blocks (as grpc-go's
encoder, here hpack's, writes them: indexed fields and one new literal with incremental
indexing) and the validation of a new list, in microseconds per block, best of ``--repeat``.

    python -m loadtest.hpack_bench
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from hpack import Decoder, Encoder

from loadtest import tools
from proxy.core.h2.hpack_cache import CachingDecoder
from proxy.core.h2.validation import validate_request

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo.Echo/UnaryEcho"),
    (b":authority", b"127.0.0.1:50051"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-go/1.34.0"),
    (b"te", b"trailers"),
]
MAX_LIST = 1 << 16


def blocks(count: int) -> list[bytes]:
    """The first block (the table's warm-up), then ``count`` with a new grpc-timeout each."""
    encoder = Encoder()
    return [
        encoder.encode([*REQUEST, (b"grpc-timeout", b"%dm" % (99_999 - i))])
        for i in range(count + 1)
    ]


def best_us(repeat: int, count: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hpack_bench", description=__doc__)
    parser.add_argument("--blocks", type=tools.positive_int, default=20_000)
    parser.add_argument("--repeat", type=tools.positive_int, default=5)
    args = parser.parse_args(argv)
    data = blocks(args.blocks)

    def hpack_run() -> None:
        decoder = Decoder(max_header_list_size=MAX_LIST)
        for block in data:
            decoder.decode(block, raw=True)

    def proxy_run() -> None:
        decoder = CachingDecoder(MAX_LIST)
        for block in data:
            decoder.decode(block)

    headers = CachingDecoder(MAX_LIST).decode(data[0])

    def validate_run() -> None:
        for _ in range(args.blocks):
            validate_request(headers)

    hpack_us = best_us(args.repeat, len(data), hpack_run)
    proxy_us = best_us(args.repeat, len(data), proxy_run)
    validate_us = best_us(args.repeat, args.blocks, validate_run)
    print(f"new grpc-go request block, {len(data):,} blocks, best of {args.repeat}:")
    print(f"  hpack Decoder           {hpack_us:6.1f} us/block")
    print(f"  proxy CachingDecoder    {proxy_us:6.1f} us/block ({hpack_us / proxy_us:.1f}x faster)")
    print(f"  validate_request        {validate_us:6.1f} us/list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
