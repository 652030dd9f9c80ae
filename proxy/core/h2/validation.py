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
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$").search
CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


def validate_request(headers: HeaderList) -> int | None:
    """None if the request is malformed; else its content-length, or -1 when it has none."""
    seen: set[bytes] = set()
    regular = False
    length = -1
    for name, value in headers:
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                return None
            seen.add(name)
            if (name == b":path" and not value) or _BAD_VALUE(value):
                return None
            continue
        regular = True
        if not name or _BAD_NAME(name) or name in CONNECTION_SPECIFIC or _BAD_VALUE(value):
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
        if name[:1] == b":" or name in CONNECTION_SPECIFIC:
            return f"bad response header {name!r}"
    return None


def validate_trailers(headers: HeaderList) -> str | None:
    for name, value in headers:
        if not name or _BAD_NAME(name) or _BAD_VALUE(value):
            return f"bad trailer {name!r}"
    return None
