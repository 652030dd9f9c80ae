"""What balancing reads from an endpoint's registration metadata: its weight and its names.

Metadata is whatever JSON the backend registered (None, a string, a number, an object), so
every reading here is lenient: a value that does not fit is ignored, never an error, because
one badly registered backend must not break picking for the whole pool.
"""

from __future__ import annotations

import json
import math
from typing import Any

from proxy.core.endpoints import Endpoint

DEFAULT_WEIGHT = 1.0


def weight_of(endpoint: Endpoint) -> float:
    """The `weight` field of a dict metadata when it is a positive finite number, else 1."""
    metadata = endpoint.metadata
    if not isinstance(metadata, dict):
        return DEFAULT_WEIGHT
    weight = metadata.get("weight")
    # JSON true/false decode to bool, which is an int in Python; a weight of `true` is a
    # registration mistake, not a weight of 1.
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return DEFAULT_WEIGHT
    weight = float(weight)
    if not math.isfinite(weight) or weight <= 0:
        return DEFAULT_WEIGHT
    return weight


def instance_id_of(endpoint: Endpoint) -> str | None:
    """The instance id the backend registered: a scalar metadata value, or a dict's `id`.

    Numbers are spelled as JSON spells them (Go's `Metadata: 1` becomes "1"), which is what a
    client writes in its pin header."""
    metadata = endpoint.metadata
    if isinstance(metadata, dict):
        metadata = metadata.get("id")
    return _scalar_text(metadata)


def key_segment_of(endpoint: Endpoint) -> str | None:
    """The last segment of the endpoint's etcd key (after the final '/').

    Discovery always files a backend under `target/...`, so a key without a '/' is not an
    etcd key: the static `--backend` list uses the sentinel "static", and pinning to "static"
    must not quietly match whichever static backend comes first."""
    key = endpoint.key
    _, slash, segment = key.rpartition("/")
    if not slash or not segment:
        return None
    return segment


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None
