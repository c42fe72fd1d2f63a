"""One input's journal row (:class:`Item`) and how it is stored: its fields as columns,
a row read back as an item, and the UPDATE that turns the row last committed into a
new one, naming only the columns that differ (see :mod:`nbankd.deposit.journal`).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from nbankd.deposit.lifecycle import FINAL, Progress, State
from nbankd.names import utf8_text


@dataclass(frozen=True)
class Item:
    """One input's journal row. ``relpath`` and friends are raw file-name bytes."""

    id: int
    token: str
    inbox: str
    relpath: bytes
    kind: str  # "file" or "dir"
    state: State
    archive: str
    archive_path: str
    placement: str
    verify: bool
    created: float
    updated: float
    attempts: int = 0
    not_before: float = 0.0
    error_code: str | None = None
    error_message: str | None = None
    sidecar_relpath: bytes | None = None
    marker_relpath: bytes | None = None
    identity: str | None = None  # JSON of the identity recorded right after claiming
    name: str | None = None
    dtype: str | None = None
    metadata_json: str | None = None
    target_name: str | None = None
    sha1: str | None = None
    size: int | None = None
    url: str | None = None
    rejected_relpath: bytes | None = None
    reason_json: str | None = None
    finished: float | None = None
    seen_identity: str | None = None  # JSON {"dev", "ino"} of the entry the scan saw
    staged_identity: str | None = None  # JSON {"name", "dev", "ino", "size", "mtime_ns"}
    auto_id: bool = False  # the identifier was chosen automatically: replaced when taken
    already: bool = False  # stored and registered already with these bytes and name
    zipped: bool = False  # a folder deposited as its canonical zip (decided at claim)
    file_metadata: str | None = None  # the reader's use, decided at claim (None: not run)
    restages: int = 0  # copies read back wrong in a row (:attr:`Progress.restages`)
    error_hint: str | None = None  # what to do about ``error_message`` (None: nothing said)

    @property
    def progress(self) -> Progress:
        return Progress(
            state=self.state,
            attempts=self.attempts,
            not_before=self.not_before,
            error_code=self.error_code,
            error_message=self.error_message,
            registered=self.url is not None,
            restages=self.restages,
        )

    def with_progress(self, p: Progress, **changes: Any) -> Item:
        """This item at progress ``p``, with other ``changes`` made in the same copy."""
        return self.changed(
            state=p.state,
            attempts=p.attempts,
            not_before=p.not_before,
            error_code=p.error_code,
            error_message=p.error_message,
            restages=p.restages,
            **changes,
        )

    def changed(self, **changes: Any) -> Item:
        """A copy with ``changes``, as ``dataclasses.replace`` makes it, at a fraction
        of its cost (every step of every item makes a few). A field items do not have
        raises TypeError."""
        if not changes.keys() <= _FIELD_NAMES:
            raise TypeError(f"Item has no field {sorted(changes.keys() - _FIELD_NAMES)}")
        new = object.__new__(Item)
        fields = new.__dict__  # frozen: set once, here, as __init__ would
        fields.update(self.__dict__)
        fields.update(changes)
        return new

    @property
    def relpath_str(self) -> str:
        return os.fsdecode(self.relpath)

    @property
    def token_bytes(self) -> bytes:
        return bytes.fromhex(self.token)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe view (file names decoded with surrogate escapes replaced)."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, bytes):
                v = v.decode("utf-8", "backslashreplace")
            elif k in ("identity", "reason_json", "metadata_json") and v:
                v = json.loads(v)
                k = k.removesuffix("_json")
            out[k] = v
        out["state"] = str(self.state)
        return out


_FIELD_NAMES = frozenset(Item.__dataclass_fields__)
SAVED_FIELDS = tuple(f for f in Item.__dataclass_fields__ if f != "id")
ALL_FIELDS = tuple(range(len(SAVED_FIELDS)))
STATE_FIELD = SAVED_FIELDS.index("state")
FINAL_VALUES = frozenset(str(s) for s in FINAL)


@functools.cache
def _update_sql(fields: tuple[int, ...]) -> str:
    """The UPDATE of the saved fields at these positions of the item's row."""
    return f"UPDATE items SET {', '.join(f'{SAVED_FIELDS[i]} = ?' for i in fields)} WHERE id = ?"


def update_statement(
    old: tuple[Any, ...] | None, row: tuple[Any, ...]
) -> tuple[str, tuple[Any, ...]]:
    """The statement that turns the item's committed ``old`` row (None: not known)
    into ``row`` (its saved fields, then its id): only the fields that differ, and
    never none, so that a durable save always has a frame to sync."""
    if old is None:
        return _update_sql(ALL_FIELDS), row
    # comprehensions, not generators: every step of every deposit saves its item
    fields = tuple([i for i in ALL_FIELDS if row[i] != old[i]]) or (STATE_FIELD,)
    return _update_sql(fields), (*[row[i] for i in fields], row[-1])


_SAVED = operator.attrgetter(*SAVED_FIELDS)
_FLAGS = tuple(SAVED_FIELDS.index(n) for n in ("verify", "auto_id", "already", "zipped"))
_TEXTS = tuple(SAVED_FIELDS.index(n) for n in ("error_message", "error_hint"))


def row_of(item: Item) -> tuple[Any, ...]:
    """The item's saved fields as the journal stores them (states as text, flags as
    0/1), then its id: the parameters of its UPDATE (a burst saves thousands a second)."""
    row = list(_SAVED(item))
    row[STATE_FIELD] = str(row[STATE_FIELD])
    for i in _FLAGS:
        row[i] = int(row[i])
    for i in _TEXTS:
        if row[i] is not None:
            # free text that may quote a file name's undecodable bytes: SQLite's text is UTF-8
            row[i] = utf8_text(row[i])
    row.append(item.id)
    return tuple(row)


def item_of_row(row: sqlite3.Row) -> Item:
    d = dict(row)
    d["state"] = State(d["state"])
    for key in ("verify", "auto_id", "already", "zipped"):
        d[key] = bool(d[key])
    return Item(**d)


__all__ = [
    "ALL_FIELDS",
    "FINAL_VALUES",
    "SAVED_FIELDS",
    "STATE_FIELD",
    "Item",
    "item_of_row",
    "row_of",
    "update_statement",
]
