"""Which backends may take calls: passive outlier detection (`outlier`) and active health
checks (`active`)."""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class HealthSource(Protocol):
    """What the server asks of active health checking (None on the server: checks are off)."""

    # Checks made, by (address, result).
    checks_total: Counter[tuple[str, str]]

    def usable(self, address: str) -> bool:
        """False while the last checks said the backend is out (NOT_SERVING or no answer)."""
        ...

    def status(self, address: str) -> str:
        """One of "serving", "not_serving", "unknown"."""
        ...
