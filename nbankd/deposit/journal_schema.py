"""The deposit journal's schema: the SQLite statements that make each version of it
from the one before (:data:`MIGRATIONS`), up to :data:`SCHEMA_VERSION`. The journal
(:mod:`nbankd.deposit.journal`) records its version with ``PRAGMA user_version`` and
runs the steps from that version on, in one transaction, when it opens."""

from __future__ import annotations

from collections.abc import Sequence

SCHEMA_VERSION = 7

MIGRATIONS: dict[int, Sequence[str]] = {
    # 0 -> 1: the first schema
    0: (
        """
        CREATE TABLE items (
            id INTEGER PRIMARY KEY,
            token TEXT NOT NULL UNIQUE,
            inbox TEXT NOT NULL,
            relpath BLOB NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            not_before REAL NOT NULL DEFAULT 0,
            error_code TEXT,
            error_message TEXT,
            archive TEXT NOT NULL,
            archive_path TEXT NOT NULL,
            placement TEXT NOT NULL,
            verify INTEGER NOT NULL,
            sidecar_relpath BLOB,
            marker_relpath BLOB,
            identity TEXT,
            name TEXT,
            dtype TEXT,
            metadata_json TEXT,
            target_name TEXT,
            sha1 TEXT,
            size INTEGER,
            url TEXT,
            rejected_relpath BLOB,
            reason_json TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            finished REAL
        )
        """,
        "CREATE INDEX items_state ON items(state)",
        "CREATE INDEX items_inbox_relpath ON items(inbox, relpath)",
        "CREATE INDEX items_name ON items(name)",
        "CREATE INDEX items_finished ON items(finished)",
    ),
    # 1 -> 2: the (device, inode) the scan saw, compared with what the claim takes
    1: ("ALTER TABLE items ADD COLUMN seen_identity TEXT",),
    # 2 -> 3: the staged copy's name and identity, as the process that wrote it saw it
    2: ("ALTER TABLE items ADD COLUMN staged_identity TEXT",),
    # 3 -> 4: whether the identifier was chosen automatically (a taken one is replaced),
    # and whether the input was found already deposited (same identifier, bytes, name)
    3: (
        "ALTER TABLE items ADD COLUMN auto_id INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE items ADD COLUMN already INTEGER NOT NULL DEFAULT 0",
    ),
    # 4 -> 5: decided at claim: a folder deposited as its canonical zip, and how the
    # datatype's metadata reader is used (read, skip, override; NULL: not run)
    4: (
        "ALTER TABLE items ADD COLUMN zipped INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE items ADD COLUMN file_metadata TEXT",
    ),
    # 5 -> 6: bad read-backs in a row, counted apart from the attempts of a step (another
    # error in between no longer restarts the growing wait before the next copy)
    5: ("ALTER TABLE items ADD COLUMN restages INTEGER NOT NULL DEFAULT 0",),
    # 6 -> 7: what to do about the error an item waits after (status, explain, alerts)
    6: ("ALTER TABLE items ADD COLUMN error_hint TEXT",),
}


__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]
