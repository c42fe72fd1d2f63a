"""Locations in the embedded registry: which archives hold a resource, added and
removed with the server's rules and messages (see :mod:`.embedded`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from nbankd import errors
from nbankd.names import is_utf8
from nbankd.registry import embedded_rules as rules
from nbankd.registry import rejections
from nbankd.registry.base import LocationRecord
from nbankd.registry.embedded_db import EmbeddedDatabase, exists

_LOCATION_SELECT = (
    "SELECT a.name, a.scheme, a.root, r.name, l.key FROM location l "
    "JOIN archive a ON a.id = l.archive_id JOIN resource r ON r.id = l.resource_id"
)


class EmbeddedLocations(EmbeddedDatabase):
    """The ``location`` table's part of the registry interface."""

    # --- locations ----------------------------------------------------------------------

    def get_locations(self, name: str) -> list[LocationRecord]:
        """The resource's locations, most accessible first; NotFound for an unknown resource."""
        if not is_utf8(name):
            raise errors.NotFound(rules.NOT_FOUND_RESOURCE)

        def read(conn: sqlite3.Connection) -> list[Any] | None:
            if not exists(conn, "SELECT 1 FROM resource WHERE name = ?", name):
                return None
            return conn.execute(
                _LOCATION_SELECT + " WHERE r.name = ? ORDER BY a.accessibility, l.id", (name,)
            ).fetchall()

        rows = self._read(read)
        if rows is None:
            raise errors.NotFound(rules.NOT_FOUND_RESOURCE)
        return [LocationRecord(*row) for row in rows]

    def get_locations_bulk(self, names: Iterable[str]) -> dict[str, list[LocationRecord]]:
        """{name: locations}; unknown names and resources without locations are omitted."""
        wanted = rules.wanted_names(names)

        def read(conn: sqlite3.Connection) -> dict[str, list[LocationRecord]]:
            out: dict[str, list[LocationRecord]] = {}
            for chunk in rules.chunks(wanted):
                rows = conn.execute(
                    _LOCATION_SELECT + f" WHERE r.name IN ({rules.marks(len(chunk))})"
                    " ORDER BY r.id DESC, a.accessibility, l.id",
                    chunk,
                )
                for row in rows:
                    out.setdefault(row[3], []).append(LocationRecord(*row))
            return out

        return self._read(read)

    def add_location(self, name: str, archive: str, key: str | None = None) -> LocationRecord:
        """Adds a location; NotFound for an unknown resource (the server answers 404)."""
        with self._write() as conn:
            resource = None
            if is_utf8(name):
                resource = conn.execute(
                    "SELECT id FROM resource WHERE name = ?", (name,)
                ).fetchone()
            if resource is None:
                raise errors.NotFound(rules.NOT_FOUND_RESOURCE)
            body: dict[str, Any] = {}
            arow = None
            if archive is None or archive == "":
                body["archive_name"] = [rules.NULL]
            elif rules.surrogates(str(archive)):
                body["archive_name"] = rules.surrogates(str(archive))
            else:
                arow = conn.execute(
                    "SELECT id, scheme, root FROM archive WHERE name = ?", (archive,)
                ).fetchone()
                if arow is None:
                    body["archive_name"] = [f"no such archive '{archive}'"]
            clean_key = None
            if key is not None:
                clean_key, messages = rules.char_field(key, max_length=1024, allow_blank=True)
                if messages:
                    body["key"] = messages
                clean_key = clean_key or None
            if body:
                raise rejections.classify(body)
            assert arow is not None
            if exists(
                conn,
                "SELECT 1 FROM location WHERE resource_id = ? AND archive_id = ?",
                resource[0],
                arow[0],
            ):
                raise rejections.classify(
                    {
                        "non_field_errors": [
                            "The fields resource_name, archive_name must make a unique set."
                        ]
                    }
                )
            if clean_key is not None and exists(
                conn, "SELECT 1 FROM location WHERE archive_id = ? AND key = ?", arow[0], clean_key
            ):
                raise rejections.classify(
                    {"key": ["another resource in this archive already has this key"]}
                )
            conn.execute(
                "INSERT INTO location (resource_id, archive_id, key) VALUES (?, ?, ?)",
                (resource[0], arow[0], clean_key),
            )
            return LocationRecord(archive, arow[1], arow[2], name, clean_key)

    def set_location_key(self, name: str, archive: str, key: str | None) -> LocationRecord:
        """Changes a location's key (django-neurobank's PATCH of the location)."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT location.id, archive.id FROM location"
                " JOIN resource ON resource.id = location.resource_id"
                " JOIN archive ON archive.id = location.archive_id"
                " WHERE resource.name = ? AND archive.name = ?",
                (rules.bindable(name), rules.bindable(archive)),
            ).fetchone()
            if row is None:
                raise errors.NotFound(rules.NOT_FOUND_LOCATION)
            clean_key = None
            if key is not None:
                clean_key, messages = rules.char_field(key, max_length=1024, allow_blank=True)
                if messages:
                    raise rejections.classify({"key": messages})
                clean_key = clean_key or None
            if clean_key is not None and exists(
                conn,
                "SELECT 1 FROM location WHERE archive_id = ? AND key = ? AND id != ?",
                row[1],
                clean_key,
                row[0],
            ):
                raise rejections.classify(
                    {"key": ["another resource in this archive already has this key"]}
                )
            conn.execute("UPDATE location SET key = ? WHERE id = ?", (clean_key, row[0]))
        return next(loc for loc in self.get_locations(name) if loc.archive_name == archive)

    def remove_location(self, name: str, archive: str) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM location WHERE resource_id = (SELECT id FROM resource WHERE name = ?)"
                " AND archive_id = (SELECT id FROM archive WHERE name = ?)",
                (rules.bindable(name), rules.bindable(archive)),  # not UTF-8: no such record
            )
            if cur.rowcount == 0:
                raise errors.NotFound(rules.NOT_FOUND_LOCATION)


__all__ = ["EmbeddedLocations"]
