"""Registry addresses compared as one registry or two: a table."""

from __future__ import annotations

import pytest

from nbankd.registry.urls import same_registry

CASES = [
    ("https://lab.org/neurobank/", "https://lab.org/neurobank/", (), True),
    ("HTTPS://Lab.Org/neurobank", "https://lab.org/neurobank/", (), True),
    ("https://lab.org:443/neurobank/", "https://lab.org/neurobank/", (), True),
    ("http://lab.org:80/nb/", "http://lab.org/nb", (), True),
    ("http://lab.org:8000/nb/", "http://lab.org/nb/", (), False),
    ("https://lab.org/other/", "https://lab.org/neurobank/", (), False),
    ("https://lab.org/Neurobank/", "https://lab.org/neurobank/", (), False),
    ("http://lab.org/neurobank/", "https://lab.org/neurobank/", (), False),
    ("https://proxy.lab.org/nb/", "https://lab.org/nb/", ("https://PROXY.lab.org/nb",), True),
    (
        "file:///var/lib/nbankd/registry.sqlite3",
        "file:///var/lib/nbankd/registry.sqlite3/",
        (),
        True,
    ),
]


@pytest.mark.parametrize(("theirs", "ours", "aliases", "same"), CASES)
def test_same_registry(theirs: str, ours: str, aliases: tuple[str, ...], same: bool) -> None:
    """Scheme and host ignore case, default ports and trailing slashes are dropped; the
    path keeps its case; aliases name the same registry."""
    assert same_registry(theirs, ours, aliases) is same
