"""Shared set-up of the audit tests (helpers in audit_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_helpers import Setup, make_setup


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """An embedded registry and an archive with 12 registered, stored resources."""
    s = make_setup(tmp_path)
    yield s
    s.registry.close()
