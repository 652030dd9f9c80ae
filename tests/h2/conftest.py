"""Hypothesis reports a failing example by importing hypothesis.extra._patching, which imports
libcst, which triggers a DeprecationWarning from mypy_extensions. Under the project's
`filterwarnings = ["error"]` that warning turns every Hypothesis failure into a pytest
INTERNALERROR that aborts the session. Import the module once here with warnings silenced so
that a failing property is reported as a normal test failure."""

from __future__ import annotations

import contextlib
import warnings

with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore")
    import hypothesis.extra._patching  # noqa: F401
