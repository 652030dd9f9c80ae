"""Fixtures for the config tests: a real etcd (``etcd_fixture``). Helpers live in
``config_support.py``; import nothing from here (several folders have a ``conftest``)."""

from __future__ import annotations

from etcd_fixture import etcd

__all__ = ["etcd"]
