"""Header-list checks of RFC 9113 section 8, done once per block on the hot path.

A relay forwards headers it did not make, so it must refuse what a backend could misread:
upper-case names, pseudo-headers out of place, and connection-specific fields, which HTTP/2
forbids and which would mean something else to the next hop.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.core.h2.events import HeaderList

_REQUEST_PSEUDO: Final = frozenset((b":method", b":scheme", b":path", b":authority"))
# RFC 9113 8.2.1: a name is lower-case token characters; a value has no NUL, CR or LF and no
# leading or trailing space or tab. A relay must not pass such fields on: an HTTP/1 hop
# further along could read a CR LF as the end of a field (request smuggling).
_BAD_NAME: Final = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]").search
# One regex for the control characters; the anchored alternatives of a single pattern
# (`^[ \t]|[ \t]$`) made the search try every position of every value, some 3,500 instructions
# a value under callgrind, paid on each header block the decoder's cache misses.
_CONTROL: Final = re.compile(rb"[\x00\r\n]").search
CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)

# Names and values that passed, remembered: a block misses the decoder's cache when one field
# is new (a grpc-go client's grpc-timeout, on most calls), and its other fields are the ones
# checked before. A set lookup costs tens of instructions, a regex search about a thousand.
# Bounded (cleared when full, short values only) so that a peer sending new values cannot
# grow it; being a pure function of the bytes, a remembered answer is the same answer.
_KNOWN_MAX: Final = 1024
_KNOWN_VALUE_LEN_MAX: Final = 128
_good_names: set[bytes] = set()
_good_values: set[bytes] = set()


def _remember(known: set[bytes], item: bytes) -> None:
    if len(known) >= _KNOWN_MAX:
        known.clear()
    if len(item) <= _KNOWN_VALUE_LEN_MAX:
        known.add(item)


def _name_ok(name: bytes) -> bool:
    """A regular field's name: token characters, lower case, not connection-specific."""
    if name in _good_names:
        return True
    if not name or _BAD_NAME(name) is not None or name in CONNECTION_SPECIFIC:
        return False
    _remember(_good_names, name)
    return True


def _value_ok(value: bytes) -> bool:
    if value in _good_values:
        return True
    # bytes.strip hands back the same length when there is nothing to strip: one C call.
    if _CONTROL(value) is not None or len(value.strip(b" \t")) != len(value):
        return False
    _remember(_good_values, value)
    return True


def validate_request(headers: HeaderList) -> int | None:
    """None if the request is malformed; else its content-length, or -1 when it has none."""
    seen: set[bytes] = set()
    regular = False
    length = -1
    for name, value in headers:
        if name.startswith(b":"):
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                return None
            seen.add(name)
            if (name == b":path" and not value) or not _value_ok(value):
                return None
            continue
        regular = True
        if not _name_ok(name) or not _value_ok(value):
            return None
        if name == b"te" and value != b"trailers":
            return None
        if name == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                return None
            length = int(value)
    if len(seen) < 3 or b":method" not in seen or b":scheme" not in seen or b":path" not in seen:
        return None
    return length


def validate_response(headers: HeaderList) -> str | None:
    if not headers or headers[0][0] != b":status":
        return "response without :status first"
    for name, _ in headers[1:]:
        if name.startswith(b":") or name in CONNECTION_SPECIFIC:
            return f"bad response header {name!r}"
    return None


def validate_trailers(headers: HeaderList) -> str | None:
    for name, value in headers:
        if not name or _BAD_NAME(name) or not _value_ok(value):
            return f"bad trailer {name!r}"
    return None
