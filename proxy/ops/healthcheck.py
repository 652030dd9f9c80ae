"""`python -m proxy.ops.healthcheck [URL]`: exit 0 if URL answers HTTP 200, else 1.

The container's HEALTHCHECK: python:3.11-slim has no curl or wget. The default URL is the
admin endpoint's /healthz, found from GRPC_ETCD_PROXY_ADMIN as the proxy finds it, so an
image run with another admin address needs no new HEALTHCHECK (an --admin flag on the command
line is not seen: set the variable instead).

Stdlib only and no other proxy module: Docker runs this every few seconds, so it must start
fast. Never exits 2, which Docker reserves.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

ADMIN_ENV = "GRPC_ETCD_PROXY_ADMIN"
DEFAULT_ADMIN = "127.0.0.1:9901"
TIMEOUT_S = 2.0
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}


def default_url(admin: str | None) -> str | None:
    """The /healthz URL for an admin HOST:PORT (a wildcard host means loopback); None if off."""
    admin = (admin or DEFAULT_ADMIN).strip()
    if admin.lower() == "off":
        return None
    host, _, port = admin.rpartition(":")
    host = host.strip("[]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def check(url: str, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, a one-line reason for `docker inspect`)."""
    # No ProxyHandler: an HTTP_PROXY set for the container must not carry a loopback check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            status: int = response.status
            body = response.read(200)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, (exc.read(200) if exc.fp is not None else b"")
    except (OSError, ValueError) as exc:
        # URLError, refused, timed out (socket.timeout is an OSError), or a malformed URL.
        return False, f"{url}: {exc}"
    reason = body.decode("utf-8", "replace").strip().splitlines()
    detail = f" {reason[0]}" if reason else ""
    return status == 200, f"{url}: HTTP {status}{detail}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m proxy.ops.healthcheck [URL]", file=sys.stderr)
        return 1
    url = args[0] if args else default_url(os.environ.get(ADMIN_ENV))
    if url is None:
        print(f"{ADMIN_ENV}=off: no admin endpoint to check", file=sys.stderr)
        return 1
    healthy, reason = check(url)
    print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
