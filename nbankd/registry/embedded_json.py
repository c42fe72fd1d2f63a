"""The SQLite functions behind the embedded registry's search filters.

:func:`register_functions` adds ``nb_text(text, lookup, value)`` (Django's text
lookups, case-insensitive ones upper-casing both sides in Python, one character at
a time, so that they work beyond ASCII) and ``nb_json(json, lookup, value_json)``
(PostgreSQL's jsonb ordering, containment, ``in`` and key lookups) to a connection.
The SQL that calls them is compiled by :mod:`nbankd.registry.embedded_search`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

# the ordering lookups nb_json answers (by PostgreSQL's jsonb order)
_ORDER_LOOKUPS = frozenset({"gt", "gte", "lt", "lte"})


def _upper(text: str) -> str:
    """Upper case one character at a time, as PostgreSQL's UPPER (and SQLite's LIKE)
    do: a character whose upper case is longer ("ß" -> "SS") is kept as it is."""
    upper = text.upper()
    if len(upper) == len(text):  # no character grew
        return upper
    return "".join(u if len(u := ch.upper()) == 1 else ch for ch in text)


def _text_match(text: Any, lookup: str, value: Any) -> int | None:
    if text is None:
        return None
    if not isinstance(value, str):  # the bytes of text that is not UTF-8: matches nothing
        return 0
    text = text if isinstance(text, str) else str(text)
    if lookup == "iregex":
        try:
            return int(re.search(value, text, re.IGNORECASE) is not None)
        except re.error:
            return 0
    if lookup.startswith("i"):
        text, value = _upper(text), _upper(value)
        lookup = lookup[1:]
    if lookup == "exact":
        return int(text == value)
    if lookup == "contains":
        return int(value in text)
    if lookup == "startswith":
        return int(text.startswith(value))
    if lookup == "endswith":
        return int(text.endswith(value))
    if lookup == "regex":
        try:
            return int(re.search(value, text) is not None)
        except re.error:
            return 0
    return None


def _kind(v: Any) -> int:
    # PostgreSQL's jsonb order: null < string < number < boolean < array < object
    if v is None:
        return 0
    if isinstance(v, str):
        return 1
    if isinstance(v, bool):
        return 3
    if isinstance(v, int | float):
        return 2
    if isinstance(v, list):
        return 4
    return 5


def _json_equal(a: Any, b: Any) -> bool:
    if _kind(a) != _kind(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _json_compare(a: Any, b: Any) -> int:
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        return -1 if ka < kb else 1
    if ka == 4:
        if len(a) != len(b):
            return -1 if len(a) < len(b) else 1
        for x, y in zip(a, b, strict=True):
            c = _json_compare(x, y)
            if c:
                return c
        return 0
    if ka == 5:
        if len(a) != len(b):
            return -1 if len(a) < len(b) else 1
        return _json_compare(sorted(a.items()), sorted(b.items()))
    if ka == 0 or a == b:
        return 0
    return -1 if a < b else 1


def _json_contains(a: Any, b: Any) -> bool:
    """PostgreSQL's ``a @> b``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and all(k in a and _json_contains(a[k], v) for k, v in b.items())
    if isinstance(a, list):
        if isinstance(b, list):
            return all(any(_json_contains(x, y) for x in a) for y in b)
        if isinstance(b, dict):
            return False
        return any(_json_equal(x, b) for x in a)
    return _json_equal(a, b)


def _json_has(a: Any, key: str) -> bool:
    """PostgreSQL's ``a ? key``: a top-level key, or a string element."""
    if isinstance(a, dict):
        return key in a
    if isinstance(a, list):
        return key in [x for x in a if isinstance(x, str)]
    return a == key


def _json_lookup(text: str | None, lookup: str, value_json: str) -> int | None:
    if text is None:
        return None
    a, b = json.loads(text), json.loads(value_json)
    if lookup in _ORDER_LOOKUPS:
        if _kind(a) != _kind(b) or _kind(a) == 0:
            return 0
        c = _json_compare(a, b)
        return int({"gt": c > 0, "gte": c >= 0, "lt": c < 0, "lte": c <= 0}[lookup])
    if lookup == "contains":
        return int(_json_contains(a, b))
    if lookup == "contained_by":
        return int(_json_contains(b, a))
    if lookup == "in":
        return int(any(_json_equal(a, x) for x in b))
    if lookup == "has_key":
        return int(_json_has(a, str(b)))
    if lookup == "has_keys":
        return int(all(_json_has(a, str(k)) for k in b))
    if lookup == "has_any_keys":
        return int(any(_json_has(a, str(k)) for k in b))
    return None


def register_functions(conn: sqlite3.Connection) -> None:
    """Adds the Python functions the compiled filters call to a connection."""
    conn.create_function("nb_text", 3, _text_match, deterministic=True)
    conn.create_function("nb_json", 3, _json_lookup, deterministic=True)
