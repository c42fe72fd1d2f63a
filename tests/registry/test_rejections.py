"""django-neurobank's 400 answers turned into typed errors (a pure table)."""

from __future__ import annotations

from typing import Any

import pytest

from nbankd import errors
from nbankd.registry.rejections import classify

CASES: list[tuple[str, dict[str, Any], type[errors.RegistryRejected]]] = [
    (
        "name taken",
        {"name": ["a resource with this name already exists."]},
        errors.NameTaken,
    ),
    ("sha1 taken", {"sha1": ["resource with this sha1 already exists."]}, errors.Sha1Taken),
    ("no dtype", {"dtype": ["no such dtype 'x'"]}, errors.UnknownDatatype),
    ("no archive", {"locations": {"0": ["no such archive 'x'"]}}, errors.UnknownArchive),
    (
        "location twice",
        {"non_field_errors": ["The fields resource_name, archive_name must make a unique set."]},
        errors.LocationTaken,
    ),
    (
        "location race, SQLite",
        {
            "detail": "UNIQUE constraint failed: nbank_registry_location.resource_id, "
            "nbank_registry_location.archive_id"
        },
        errors.LocationTaken,
    ),
    (
        "location race, PostgreSQL",
        {
            "detail": 'duplicate key value violates unique constraint "nbank_registry_location_'
            'resource_id_archive_id_3a1e_uniq"\nDETAIL:  Key (resource_id, archive_id)=(4, 2) '
            "already exists."
        },
        errors.LocationTaken,
    ),
    (
        "key race, SQLite",
        {
            "detail": "UNIQUE constraint failed: nbank_registry_location.archive_id, "
            "nbank_registry_location.key"
        },
        errors.RegistryRejected,
    ),
    (
        "another integrity error",
        {"detail": "FOREIGN KEY constraint failed"},
        errors.RegistryRejected,
    ),
    ("nothing said", {}, errors.RegistryRejected),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_400_body_becomes_its_typed_error(
    body: dict[str, Any], expected: type[errors.RegistryRejected]
) -> None:
    """Each 400 body becomes exactly its error class (a plain rejection otherwise)."""
    assert type(classify(body)) is expected
