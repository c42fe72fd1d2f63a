"""django-neurobank's field rules and messages, as the embedded registry applies them.

Each helper returns the cleaned value and the messages the server's serializers
(DRF and Django validators, in the order DRF runs them) would give for it; the
registry gathers them into the server's field-keyed 400 body.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from nbankd.names import is_utf8
from nbankd.registry.base import CORE_FIELDS, SLUG_RE, core_field_as_stored

CHUNK = 500  # names per IN (...) and rows per search page
_ID_ALPHABET = string.digits + string.ascii_lowercase
_ID_LENGTH = 8

NOT_FOUND_RESOURCE = "No Resource matches the given query."
NOT_FOUND_LOCATION = "No Location matches the given query."
# Django's and DRF's own messages, which the server returns for these causes
NULL = "This field may not be null."
BLANK = "This field may not be blank."
NOT_STRING = "Not a valid string."
NUL_CHARS = "Null characters are not allowed."
SLUG = "can only contain letters, numbers, underscores, and hyphens"
INVALID_JSON = "Value must be valid JSON."


def max_length_message(n: int) -> str:
    return f"Ensure this field has no more than {n} characters."


def random_id() -> str:
    """8 lowercase base-36 characters, like django-neurobank's automatic names."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def os_user() -> str:
    """The user name of this process, recorded as ``created_by``."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def char_field(
    value: object, *, max_length: int, allow_blank: bool = False
) -> tuple[str | None, list[str]]:
    """A DRF CharField: (stripped value, messages)."""
    if value is None:
        return None, [NULL]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None, [NOT_STRING]
    text = str(value).strip()
    if text == "":
        return "", ([] if allow_blank else [BLANK])
    messages = []
    if len(text) > max_length:
        messages.append(max_length_message(max_length))
    if "\x00" in text:
        messages.append(NUL_CHARS)
    messages.extend(surrogates(text))
    return text, messages


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogates(text: str) -> list[str]:
    """The message for a lone surrogate in ``text`` (a non-UTF-8 byte of a file name, as
    Python keeps it, or a JSON escape), which no record can hold; [] when there is none."""
    found = _SURROGATE.search(text)  # one pass in C (every registration checks its fields)
    if found is None:
        return []
    return [f"Surrogate characters are not allowed: U+{ord(found.group()):X}."]


def bindable(value: Any) -> Any:
    """``value`` as an SQL parameter: text that is not UTF-8 (lone surrogates) becomes
    its bytes, a BLOB, which equals and matches no stored text, instead of making
    sqlite3 raise UnicodeEncodeError."""
    if isinstance(value, str) and not is_utf8(value):
        return value.encode("utf-8", "surrogatepass")
    return value


def slug_field(
    value: object, *, max_length: int, taken: Callable[[str], bool], taken_message: str
) -> tuple[str | None, list[str]]:
    """A unique slug name: uniqueness first, then length, characters and the slug rule."""
    text, messages = char_field(value, max_length=max_length)
    if text is None or text == "":
        return text, messages
    if is_utf8(text) and taken(text):  # text SQLite cannot hold names no record
        messages.insert(0, taken_message)
    if not SLUG_RE.fullmatch(text):
        messages.append(SLUG)
    return text, messages


def person(field: str, value: Any) -> tuple[str | None, list[str]]:
    """experimenter/animal: stored as given, as text; "" means none, as on the server."""
    text = core_field_as_stored(value)
    if text is None:
        return None, []
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None, [
            "invalid username" if field == "experimenter" else "invalid animal identifier"
        ]
    messages = surrogates(text)
    return (None, messages) if messages else (text, [])


def split_metadata(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(other metadata, the core fields found in it)."""
    rest: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for key, value in metadata.items():
        (found if key in CORE_FIELDS else rest)[key] = value
    return rest, found


def dump_metadata(metadata: Mapping[str, Any]) -> str | None:
    """Canonical JSON text (as ResourceRecord keeps it), or None if it is not JSON."""
    try:
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None


def shown_metadata(stored: str | None, experimenter: str | None, animal: str | None) -> str | None:
    """The record's metadata: stored metadata plus copies of the core fields; as stored
    when it cannot be read (nested too deep: reading the record's metadata then names
    it, :meth:`~nbankd.registry.base.ResourceRecord.metadata`) or is not an object."""
    if experimenter is None and animal is None:
        return stored
    try:
        shown = json.loads(stored) if stored is not None else {}
    except RecursionError:
        return stored
    if not isinstance(shown, dict):
        return stored
    if animal is not None:
        shown["animal"] = animal
    if experimenter is not None:
        shown["experimenter"] = experimenter
    return json.dumps(shown, sort_keys=True)


def display_stamp(stamp: str) -> str:
    """DRF prints isoformat(): no fraction when it is zero, "Z" for UTC."""
    return stamp[:-8] + "Z" if stamp.endswith(".000000Z") else stamp


def filename(name: str, extension: str) -> str:
    """The name plus the dtype's extension when the name has no suffix."""
    ext = extension.lstrip(".")
    if ext and not PurePosixPath(name).suffix:
        return f"{name}.{ext}"
    return name


def wanted_names(names: Iterable[str]) -> list[str]:
    """The distinct names of a bulk lookup that a record could have (UTF-8 text)."""
    return [n for n in dict.fromkeys(str(n) for n in names) if is_utf8(n)]


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def marks(n: int) -> str:
    return ", ".join("?" * n)


def clean_filter(value: object) -> str | None:
    """A django-filter CharFilter value: stripped; None (filter skipped) when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None
