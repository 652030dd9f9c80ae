"""Fixtures for the admin tests: a real etcd (``etcd_fixture``). Helpers live in
``admin_support.py`` (import nothing from here: several folders have a module named
``conftest``)."""

from __future__ import annotations

from etcd_fixture import etcd

__all__ = ["etcd"]
