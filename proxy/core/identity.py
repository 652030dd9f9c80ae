"""Who a client is, as its verified certificate names it (read from `getpeercert()`'s dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified client certificate names."""

    common_name: str = ""
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()

    @property
    def primary(self) -> str:
        """The name the access log shows: a URI SAN (SPIFFE) first, then DNS, then the CN."""
        for names in (self.uris, self.dns):
            if names:
                return names[0]
        return self.common_name

    def names(self) -> frozenset[str]:
        return frozenset((*self.uris, *self.dns, *([self.common_name] if self.common_name else ())))


def identity_of(peercert: dict[str, Any] | None) -> Identity | None:
    """From `SSLObject.getpeercert()` (a dict only when the certificate was verified)."""
    if not peercert:
        return None
    common_name = ""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = value
    uris = tuple(v for k, v in peercert.get("subjectAltName", ()) if k == "URI")
    dns = tuple(v for k, v in peercert.get("subjectAltName", ()) if k == "DNS")
    return Identity(common_name, uris, dns)
