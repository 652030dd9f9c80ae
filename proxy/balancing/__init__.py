"""Balancing policies: pure functions of (pool snapshot, call headers) -> endpoint."""
