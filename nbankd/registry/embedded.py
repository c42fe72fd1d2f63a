"""The embedded registry: django-neurobank's data model in one SQLite file.

It enforces the server's rules and, for the same cause, raises the same typed
error with the same message: each check builds the field-keyed body the server
would answer with and hands it to :func:`nbankd.registry.rejections.classify`.
There are no user or animal tables; ``experimenter`` and ``animal`` are stored
as given.

Concurrency: every thread gets its own connection (opened on first use, and
again after a fork), so one ``EmbeddedRegistry`` may be shared by threads, and
any number of processes may open the same file. The database is in WAL mode
(readers never block the writer), each write is one ``BEGIN IMMEDIATE``
transaction that validates and writes under the write lock (so uniqueness holds
across processes), and waiting for the lock is bounded by ``busy_timeout``;
running out of it raises the transient :class:`~nbankd.errors.RegistryUnavailable`.
Searches read in short chunks (keyset pagination by name), so a long iteration
never holds a read transaction open or blocks checkpoints.

The file is created mode 0640 whatever the umask (SQLite gives its ``-wal`` and
``-shm`` files the database's mode); an existing file's mode is left alone. A user
who can read it but not create those files (the registry's group, while nbankd is
stopped) gets a read-only registry (see ``embedded_db``): writes are refused.

Modules: ``embedded_schema`` (file, connections, schema, migrations),
``embedded_rules`` (the server's field rules and messages), ``embedded_search``
(ResourceFilter and metadata filters in SQL).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import nbankd
from nbankd import errors
from nbankd.names import is_utf8
from nbankd.registry import embedded_rules as rules
from nbankd.registry import rejections
from nbankd.registry.base import (
    ARCHIVE_NAME_MAX,
    DATATYPE_NAME_MAX,
    RESOURCE_NAME_MAX,
    SHA1_RE,
    ArchiveRecord,
    DataType,
    ResourceRecord,
    by_root,
    full_url,
    json_shape,
    read_metadata,
    unstorable_metadata,
)
from nbankd.registry.embedded_db import exists
from nbankd.registry.embedded_locations import EmbeddedLocations
from nbankd.registry.embedded_search import compile_search, format_stamp

API_VERSION = "1.2"
_ACCESSIBILITY = ("local", "remote", "offline")  # stored as 0, 1, 2, as on the server

_RESOURCE_SELECT = (
    "SELECT r.id, r.name, r.sha1, d.name, d.extension, r.created_on, r.created_by, "
    "r.metadata, r.experimenter, r.animal FROM resource r JOIN datatype d ON d.id = r.dtype_id"
)


class EmbeddedRegistry(EmbeddedLocations):
    """A django-neurobank-compatible registry in a SQLite file (see the module docstring)."""

    backend = "embedded"

    # --- info ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "name": "nbankd-embedded",
            "version": nbankd.__version__,
            "api_version": API_VERSION,
        }

    def resource_url(self, name: str) -> str:
        return full_url(self.url, name)

    def schema_version(self) -> int:
        """The schema version stored in the database (``PRAGMA user_version``)."""
        return self._read(lambda conn: int(conn.execute("PRAGMA user_version").fetchone()[0]))

    # --- datatypes ----------------------------------------------------------------------

    def list_datatypes(self) -> list[DataType]:
        sql = "SELECT name, content_type, extension FROM datatype ORDER BY name"
        return self._read(lambda conn: [DataType(*row) for row in conn.execute(sql)])

    def add_datatype(self, name: str, content_type: str = "", extension: str = "") -> DataType:
        with self._write() as conn:
            body: dict[str, Any] = {}
            clean, messages = rules.slug_field(
                name,
                max_length=DATATYPE_NAME_MAX,
                taken=lambda v: exists(conn, "SELECT 1 FROM datatype WHERE name = ?", v),
                taken_message="a dtype with this name already exists",
            )
            if messages:
                body["name"] = messages
            ctype, messages = rules.char_field(content_type, max_length=128, allow_blank=True)
            if messages:
                body["content_type"] = messages
            ext, messages = rules.char_field(extension, max_length=8, allow_blank=True)
            if messages:
                body["extension"] = messages
            if body:
                raise rejections.classify(body)
            conn.execute(
                "INSERT INTO datatype (name, content_type, extension) VALUES (?, ?, ?)",
                (clean, ctype, ext),
            )
            return DataType(str(clean), ctype or "", ext or "")

    # --- archives -----------------------------------------------------------------------

    def list_archives(self, **filters: str) -> list[ArchiveRecord]:
        """Archives by name; filters as the server's: name/scheme istartswith, root iexact,
        accessibility 0/1/2."""
        where, params = [], []
        for field, lookup in (("name", "istartswith"), ("scheme", "istartswith")):
            value = rules.clean_filter(filters.get(field))
            if value is not None:
                where.append(f"nb_text({field}, '{lookup}', ?)")
                params.append(value)
        root = rules.clean_filter(filters.get("root"))
        if root is not None:
            where.append("nb_text(root, 'iexact', ?)")
            params.append(root)
        access = rules.clean_filter(filters.get("accessibility"))
        if access is not None:
            if access not in ("0", "1", "2"):
                raise rejections.classify(
                    {
                        "accessibility": [
                            f"Select a valid choice. {access} is not one of the available choices."
                        ]
                    }
                )
            where.append("accessibility = ?")
            params.append(int(access))
        return self._archives(where, params)

    def _archives(self, where: list[str], params: list[Any]) -> list[ArchiveRecord]:
        sql = "SELECT name, scheme, root, accessibility FROM archive"
        if where:
            sql += " WHERE " + " AND ".join(where)
        bound = [rules.bindable(p) for p in params]
        rows = self._read(lambda conn: conn.execute(sql + " ORDER BY name", bound).fetchall())
        return [ArchiveRecord(n, s, r, _ACCESSIBILITY[a]) for n, s, r, a in rows]

    def get_archive(self, name: str) -> ArchiveRecord | None:
        found = self._archives(["name = ?"], [name])
        return found[0] if found else None

    def find_archive_by_root(self, root: str, scheme: str = "neurobank") -> ArchiveRecord | None:
        """The archive with this (scheme, root): see :func:`~nbankd.registry.base.by_root`."""
        root = str(root).strip()
        found = self._archives(["scheme = ?", "nb_text(root, 'iexact', ?)"], [scheme, root])
        return by_root(found, root, scheme)

    def add_archive(
        self, name: str, scheme: str, root: str, accessibility: str = "local"
    ) -> ArchiveRecord:
        with self._write() as conn:
            body: dict[str, Any] = {}
            clean, messages = rules.slug_field(
                name,
                max_length=ARCHIVE_NAME_MAX,
                taken=lambda v: exists(conn, "SELECT 1 FROM archive WHERE name = ?", v),
                taken_message="an archive with this name already exists",
            )
            if messages:
                body["name"] = messages
            clean_scheme, messages = rules.char_field(scheme, max_length=16)
            if messages:
                body["scheme"] = messages
            clean_root, messages = rules.char_field(root, max_length=512)
            if messages:
                body["root"] = messages
            if accessibility is None:
                body["accessibility"] = [rules.NULL]
            # as on the server, an unknown accessibility means local
            level = str(accessibility).lower() if isinstance(accessibility, str) else ""
            access = _ACCESSIBILITY.index(level) if level in _ACCESSIBILITY else 0
            if body:
                raise rejections.classify(body)
            if exists(
                conn,
                "SELECT 1 FROM archive WHERE scheme = ? AND root = ?",
                clean_scheme,
                clean_root,
            ):
                raise rejections.classify(
                    {"non_field_errors": ["The fields scheme, root must make a unique set."]}
                )
            conn.execute(
                "INSERT INTO archive (name, scheme, root, accessibility) VALUES (?, ?, ?, ?)",
                (clean, clean_scheme, clean_root, access),
            )
            return ArchiveRecord(
                str(clean), str(clean_scheme), str(clean_root), _ACCESSIBILITY[access]
            )

    # --- resources ----------------------------------------------------------------------

    def add_resource(
        self,
        *,
        dtype: str,
        archive: str | None,
        name: str | None = None,
        sha1: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> ResourceRecord:
        """Registers a resource located in ``archive``; ``name=None`` picks a random id.

        ``experimenter``/``animal`` keys of metadata become the resource's fields.
        ``key`` (the location key in the archive) is ignored without an archive; an
        empty key means none.
        """
        with self._write() as conn:
            body: dict[str, Any] = {}
            core: dict[str, Any] = {}
            unstorable = None
            if isinstance(metadata, Mapping):
                # judged whole, experimenter and animal included, as HttpRegistry sends it
                unstorable = unstorable_metadata(metadata)
                metadata, core = rules.split_metadata(metadata)
            clean_name = None
            if name is not None:
                clean_name, messages = rules.slug_field(
                    name,
                    max_length=RESOURCE_NAME_MAX,
                    taken=lambda v: exists(conn, "SELECT 1 FROM resource WHERE name = ?", v),
                    taken_message="a resource with this name already exists",
                )
                if messages:
                    body["name"] = messages
            clean_sha1 = None
            if sha1 is not None:
                clean_sha1, messages = self._sha1_field(conn, sha1)
                if messages:
                    body["sha1"] = messages
            dtype_row = None
            if dtype is None or dtype == "":
                body["dtype"] = [rules.NULL]
            elif rules.surrogates(str(dtype)):
                body["dtype"] = rules.surrogates(str(dtype))
            else:
                dtype_row = conn.execute(
                    "SELECT id, extension FROM datatype WHERE name = ?", (str(dtype),)
                ).fetchone()
                if dtype_row is None:
                    body["dtype"] = [f"no such dtype '{dtype}'"]
            metadata_json = None
            if metadata is not None:
                metadata_json = (
                    rules.dump_metadata(metadata) if isinstance(metadata, Mapping) else None
                )
                if not isinstance(metadata, Mapping):
                    body["metadata"] = ["metadata must be a dictionary"]
                elif metadata_json is None:
                    body["metadata"] = [rules.INVALID_JSON]
                elif unstorable:
                    body["metadata"] = [unstorable]  # django-neurobank fails (500) on these
            people: dict[str, str | None] = {}
            for field in ("experimenter", "animal"):
                people[field], messages = rules.person(field, core.get(field))
                if messages:
                    body[field] = messages
            archive_id = None
            if archive is not None:
                key = key or None
                archive_id, messages = self._location_field(conn, archive, key)
                if messages:
                    body["locations"] = messages
            if body:
                raise rejections.classify(body)
            assert dtype_row is not None
            while clean_name is None:
                candidate = rules.random_id()
                if not exists(conn, "SELECT 1 FROM resource WHERE name = ?", candidate):
                    clean_name = candidate
            cur = conn.execute(
                "INSERT INTO resource (name, sha1, dtype_id, created_on, created_by, metadata, "
                "experimenter, animal) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    clean_name,
                    clean_sha1,
                    dtype_row[0],
                    format_stamp(datetime.now(UTC)),
                    self._user,
                    metadata_json,
                    people["experimenter"],
                    people["animal"],
                ),
            )
            if archive_id is not None:
                conn.execute(
                    "INSERT INTO location (resource_id, archive_id, key) VALUES (?, ?, ?)",
                    (cur.lastrowid, archive_id, key),
                )
            return self._fetch_resource(conn, clean_name)

    def _location_field(
        self, conn: sqlite3.Connection, archive: str, key: str | None
    ) -> tuple[int | None, Any]:
        """(the archive's id, the ``locations`` messages) of a new resource's location."""
        bad = rules.surrogates(archive) if isinstance(archive, str) else []
        if bad:
            return None, {"0": bad}
        row = conn.execute("SELECT id FROM archive WHERE name = ?", (archive,)).fetchone()
        if row is None:
            return None, {"0": [f"no such archive '{archive}'"]}
        bad = rules.surrogates(key) if isinstance(key, str) else []
        if bad:
            return row[0], bad
        if key is not None and exists(
            conn, "SELECT 1 FROM location WHERE archive_id = ? AND key = ?", row[0], key
        ):
            return row[0], [f"key '{key}' is already used in archive '{archive}'"]
        return row[0], []

    def _sha1_field(self, conn: sqlite3.Connection, sha1: object) -> tuple[str | None, list[str]]:
        text, messages = rules.char_field(sha1, max_length=40, allow_blank=True)
        if messages or text is None:
            return None, messages
        if not SHA1_RE.fullmatch(text):
            return None, ["invalid sha1 value"]
        text = text.lower()
        if exists(conn, "SELECT 1 FROM resource WHERE sha1 = ?", text):
            return None, ["a resource with this sha1 already exists"]
        return text, []

    def _fetch_resource(self, conn: sqlite3.Connection, name: str) -> ResourceRecord:
        rows = conn.execute(_RESOURCE_SELECT + " WHERE r.name = ?", (name,)).fetchall()
        return self._records(conn, rows)[0]

    def _records(
        self, conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]
    ) -> list[ResourceRecord]:
        """Records for resource rows (in their order), with their archives by name."""
        archives: dict[int, list[str]] = {}
        if rows:
            ids = [row[0] for row in rows]
            found = conn.execute(
                "SELECT l.resource_id, a.name FROM location l JOIN archive a ON a.id = l.archive_id"
                f" WHERE l.resource_id IN ({rules.marks(len(ids))}) ORDER BY a.name",
                ids,
            )
            for rid, aname in found:
                archives.setdefault(rid, []).append(aname)
        out = []
        for rid, name, sha1, dtype, ext, created_on, created_by, md, experimenter, animal in rows:
            out.append(
                ResourceRecord(
                    name=name,
                    sha1=sha1,
                    dtype=dtype,
                    locations=tuple(archives.get(rid, ())),
                    experimenter=experimenter,
                    animal=animal,
                    created_by=created_by,
                    created_on=rules.display_stamp(created_on),
                    filename=rules.filename(name, ext),
                    metadata_json=rules.shown_metadata(md, experimenter, animal),
                )
            )
        return out

    def get_resource(self, name: str) -> ResourceRecord | None:
        if not is_utf8(name):
            return None

        def read(conn: sqlite3.Connection) -> ResourceRecord | None:
            rows = conn.execute(_RESOURCE_SELECT + " WHERE r.name = ?", (name,)).fetchall()
            return self._records(conn, rows)[0] if rows else None

        return self._read(read)

    def get_resources(self, names: Iterable[str]) -> list[ResourceRecord]:
        """Bulk lookup; unknown names are omitted; newest first, as the server sends them."""
        wanted = rules.wanted_names(names)

        def read(conn: sqlite3.Connection) -> list[ResourceRecord]:
            rows: list[Sequence[Any]] = []
            for chunk in rules.chunks(wanted):
                rows.extend(
                    conn.execute(
                        _RESOURCE_SELECT + f" WHERE r.name IN ({rules.marks(len(chunk))})", chunk
                    ).fetchall()
                )
            rows.sort(key=lambda row: row[0], reverse=True)
            out: list[ResourceRecord] = []
            for chunk in rules.chunks(rows):
                out.extend(self._records(conn, chunk))
            return out

        return self._read(read)

    def search(self, **filters: str) -> Iterator[ResourceRecord]:
        """Resources matching django-neurobank's filters, by name (see embedded_search).

        Bad filter values raise RegistryRejected here, before iteration starts.
        """
        compiled = compile_search(filters)
        return self._search(compiled.where, compiled.params)

    def _search(self, where: list[str], params: list[Any]) -> Iterator[ResourceRecord]:
        last: str | None = None
        while True:
            clauses = [*where, "r.name > ?"] if last is not None else list(where)
            args = [*params, last] if last is not None else list(params)
            sql = _RESOURCE_SELECT
            if clauses:
                sql += " WHERE " + " AND ".join(f"({c})" for c in clauses)
            sql += " ORDER BY r.name LIMIT ?"

            def read(
                conn: sqlite3.Connection, sql: str = sql, args: list[Any] = args
            ) -> tuple[list[Any], list[ResourceRecord]]:
                rows = conn.execute(sql, [*args, rules.CHUNK]).fetchall()
                return rows, self._records(conn, rows)

            rows, records = self._read(read)
            yield from records
            if len(rows) < rules.CHUNK:
                return
            last = rows[-1][1]

    def update_metadata(self, name: str, metadata: Mapping[str, Any]) -> ResourceRecord:
        """Merges metadata into the record; a value of None deletes the key.

        ``experimenter``/``animal`` keys set (or, with None, clear) those fields.
        """
        with self._write() as conn:
            row = None
            if is_utf8(name):
                row = conn.execute(
                    "SELECT id, metadata FROM resource WHERE name = ?", (name,)
                ).fetchone()
            if row is None:
                raise errors.NotFound(rules.NOT_FOUND_RESOURCE)
            if not isinstance(metadata, Mapping):
                raise rejections.classify({"metadata": ["metadata must be a dictionary"]})
            rest, core = rules.split_metadata(metadata)
            body: dict[str, Any] = {}
            stored = read_metadata(name, row[1]) if row[1] is not None else {}
            if not isinstance(stored, dict):
                raise errors.RegistryError(
                    f"resource {name!r}: its stored metadata is {json_shape(stored)}, not an "
                    "object, so nothing can be merged into it",
                    hint="replace that resource's metadata in the registry with an object",
                )
            merged = dict(stored)
            for k, v in rest.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            merged_json = rules.dump_metadata(merged)
            if merged_json is None:
                body["metadata"] = [rules.INVALID_JSON]
            elif unstorable := unstorable_metadata(  # experimenter and animal included
                {k: v for k, v in metadata.items() if v is not None}
            ):
                body["metadata"] = [unstorable]
            people: dict[str, str | None] = {}
            for field in ("experimenter", "animal"):
                if field in core:
                    people[field], messages = rules.person(field, core[field])
                    if messages:
                        body[field] = messages
            if body:
                raise rejections.classify(body)
            conn.execute("UPDATE resource SET metadata = ? WHERE id = ?", (merged_json, row[0]))
            for field, value in people.items():
                conn.execute(f"UPDATE resource SET {field} = ? WHERE id = ?", (value, row[0]))
            return self._fetch_resource(conn, name)


__all__ = ["EmbeddedRegistry"]
