"""Balancing policies: pure functions of (pool snapshot, call headers, in-flight counts) ->
endpoint. `Balancer` is the one entry point; the modules behind it are one concern each."""

from proxy.core.balancing.balancer import Balancer, NoPick, NoPickKind

__all__ = ["Balancer", "NoPick", "NoPickKind"]
