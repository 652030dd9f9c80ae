"""tests/container: the Dockerfile, its commands outside Docker, and deploy/kubernetes."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: installs the project from PyPI into a fresh venv (a minute or more; "
        "deselect with -m 'not slow')",
    )
