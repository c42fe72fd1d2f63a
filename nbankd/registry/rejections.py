"""Turns django-neurobank's field-keyed validation errors into typed errors.

Both backends use this: the HTTP client feeds it the body of a 400 answer, the
embedded registry builds the same body for the same cause. So a caller sees the
same exception class and message whichever registry it talks to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbankd import errors

# (field, text fragment) -> error class; the first match wins.
_RULES: tuple[tuple[str, str, type[errors.RegistryRejected]], ...] = (
    ("name", "a resource with this name already exists", errors.NameTaken),
    ("name", "a dtype with this name already exists", errors.DatatypeTaken),
    ("name", "an archive with this name already exists", errors.ArchiveTaken),
    ("name", "", errors.InvalidName),
    ("sha1", "already exists", errors.Sha1Taken),
    ("dtype", "no such dtype", errors.UnknownDatatype),
    ("locations", "no such archive", errors.UnknownArchive),
    ("archive_name", "no such archive", errors.UnknownArchive),
    ("resource_name", "no such resource", errors.NotFoundRejection),
    ("experimenter", "", errors.InvalidUser),
    ("animal", "", errors.InvalidUser),
    ("non_field_errors", "scheme, root must make a unique set", errors.ArchiveTaken),
    (
        "non_field_errors",
        "resource_name, archive_name must make a unique set",
        errors.LocationTaken,
    ),
)


def flatten_fields(body: Mapping[str, Any]) -> dict[str, list[str]]:
    """Normalises a 400 body to {field: [messages]}.

    django-neurobank sends lists per field, a bare string for ``detail``, and a
    dict keyed by list index for ``locations`` (``{"0": ["no such archive 'x'"]}``).
    """
    out: dict[str, list[str]] = {}
    for field, value in body.items():
        messages: list[str] = []
        if isinstance(value, str):
            messages.append(value)
        elif isinstance(value, Mapping):
            for inner in value.values():
                messages.extend(flatten_fields({"_": inner})["_"])
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    messages.append(item)
                else:
                    messages.extend(flatten_fields({"_": item})["_"])
        else:
            messages.append(str(value))
        out[field] = messages
    return out


def describe(fields: Mapping[str, list[str]]) -> str:
    """One line, ``field: message; field: message``, as nbank prints them."""
    return "; ".join(f"{k}: {m}" for k, ms in fields.items() for m in ms)


#: a location added twice at once: django-neurobank's serializer checks the pair, then
#: the database refuses the second insert and the server answers 400 with the
#: database's own words in ``detail`` (SQLite, then PostgreSQL). Only the
#: (resource, archive) pair: the (archive, key) rule is another refusal
_LOCATION_RACE = (
    "UNIQUE constraint failed: nbank_registry_location.resource_id, "
    "nbank_registry_location.archive_id",
    'duplicate key value violates unique constraint "nbank_registry_location_',
)


def classify(body: Mapping[str, Any]) -> errors.RegistryRejected:
    """Returns the typed error for a django-neurobank 400 body (or its embedded twin)."""
    fields = flatten_fields(body)
    message = describe(fields) or "the registry rejected the request"
    if any(race in text for text in fields.get("detail", ()) for race in _LOCATION_RACE):
        hint = _HINTS.get(errors.LocationTaken, "")
        return errors.LocationTaken(message, fields=fields, hint=hint)
    for field, fragment, cls in _RULES:
        for text in fields.get(field, ()):
            if fragment in text:
                return cls(message, fields=fields, hint=_HINTS.get(cls, ""))
    return errors.RegistryRejected(message, fields=fields)


_HINTS: dict[type[errors.RegistryRejected], str] = {
    errors.NameTaken: "choose another identifier, or let the archive assign one (auto_id)",
    errors.Sha1Taken: "this content is already registered; look it up with nbankctl verify",
    errors.InvalidName: "identifiers may contain only letters, digits, '-' and '_'",
    errors.UnknownDatatype: "create it with 'nbankctl dtype add NAME CONTENT_TYPE'",
    errors.UnknownArchive: "register the archive with 'nbankctl init' or 'create: true'",
    errors.InvalidUser: "experimenter must be a registry username",
}
