"""Whether a record's metadata holds what was sent, as registries store it (a table)."""

from __future__ import annotations

from typing import Any

import pytest

from nbankd.registry.base import metadata_as_stored


@pytest.mark.parametrize(
    ("sent", "record", "stored"),
    [
        ({"rig": "r2"}, {"rig": "r2"}, True),
        ({"rig": "r2"}, {"rig": "r3"}, False),
        ({"animal": 417}, {"animal": "417"}, True),  # the core fields are text
        ({"animal": 417}, {"animal": "418"}, False),
        ({"experimenter": ""}, {}, True),  # "" is none: no key in the record
        ({"experimenter": ""}, None, True),
        ({"experimenter": "ana"}, {}, False),
        ({"bird": "b12"}, {"animal": "b12"}, True),  # an alias moved into a core field
        ({"bird": "b12"}, {"animal": "b13"}, False),
        ({"bird": "b12"}, {}, False),
        ({"temp": 20.5}, {}, False),  # a plain key missing is not stored
        ({"count": 3}, {"count": 3.0}, True),  # JSON numbers compare by value
    ],
)
def test_a_record_holds_what_was_sent(
    sent: dict[str, Any], record: dict[str, Any] | None, stored: bool
) -> None:
    """Each sent key is in the record as the registry keeps it, or not."""
    assert metadata_as_stored(sent, record) is stored
