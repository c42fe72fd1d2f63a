"""``copy``: resources copied into another archive on this host and located there.

The steps of ``nbankctl copy`` (and of the running daemon's ``copy`` control
command, which runs them for an admin as the archive's user), writing what they
do to an :class:`Output`: nbankctl's console, or the daemon's job record that
nbankctl replays (:mod:`nbankd.control.job_handlers`). Each resource is read once,
checked against its registered SHA-1 and stored by :mod:`nbankd.transfer.receive`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from nbankd import errors
from nbankd.archive.access import require_owner
from nbankd.archive.layout import Archive
from nbankd.hashing import SourceReadError
from nbankd.registry.base import Registry
from nbankd.transfer.reading import Advance
from nbankd.transfer.receive import copy_resource, register_copy
from nbankd.transfer.sources import Source, find_sources

UNVERIFIED = " (no registered hash to check)"


class Output(Protocol):
    """Where the steps say what they do: progress and results (``log``), one JSON
    object per resource and a summary (``emit``), each failure (``failed``)."""

    @property
    def failures(self) -> int: ...
    def log(self, text: str) -> None: ...
    def emit(self, obj: dict[str, Any]) -> None: ...
    def failed(self, unreachable: bool) -> None: ...
    def progress(self, total: int | None) -> AbstractContextManager[Advance | None]: ...


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def total_size(sources: list[Source]) -> int | None:
    """The bytes to read (for a progress bar); None when a folder is among them."""
    total = 0
    for s in sources:
        try:
            st = os.lstat(s.path) if s.path is not None else None
        except OSError:
            continue
        if st is None or stat.S_ISDIR(st.st_mode):
            return None
        total += st.st_size
    return total


def failed(out: Output, id: str, why: object) -> None:
    """Says that resource ``id`` failed, and why."""
    out.failed(isinstance(why, errors.RegistryUnavailable | errors.RegistryAuthError))
    out.log(f"  ✗ {id} -> {why}")
    out.emit({"id": id, "status": "failed", "message": str(why)})


def unlocated(out: Output, sources: list[Source]) -> list[Source]:
    """Reports the sources without a readable copy here; returns the others."""
    for s in sources:
        if not s.ok:
            failed(out, s.id, s.error)
    return [s for s in sources if s.ok]


def copy_into(
    reg: Registry,
    archive: Archive,
    ids: Sequence[str],
    out: Output,
    *,
    source_archive: str | None = None,
    dry_run: bool = False,
) -> None:
    """Copies (or with ``dry_run`` reads and checks) the resources ``ids`` into
    ``archive``, reading only copies in ``source_archive`` when given."""
    record = reg.find_archive_by_root(str(archive.path))
    if record is None:
        raise errors.NotFound(
            f"no archive with root {archive.path} in registry {reg.url}",
            hint="register it with nbankctl init, or ask the registry's admin",
        )
    if source_archive == record.name:
        raise errors.UsageError(
            f"the source and destination archives are the same ('{record.name}')",
            hint="give -a another archive, or another DEST",
        )
    out.log(f"destination archive: {record.name} ({archive.path})")
    if not dry_run:
        require_owner(archive, "a copy")
    if dry_run:
        out.log("DRY RUN: checking resources without copying them")
    todo: list[Source] = []
    already = 0
    for s in find_sources(reg, ids, archive=source_archive):
        if s.record is not None and record.name in s.record.locations:
            already += 1
            out.log(f"  - {s.id} -> already in the destination archive")
            out.emit({"id": s.id, "status": "already"})
        else:
            todo.append(s)
    sources = unlocated(out, todo)
    copied, total = _copy_all(reg, archive, record.name, sources, out, dry_run)
    verb = "checked" if dry_run else "copied"
    text = (
        f"Resources requested: {len(ids)}; {verb}: {copied} ({human_size(total)}); "
        f"already in destination: {already}; failed: {out.failures}"
    )
    out.log(text + (" (marked with ✗ above)" if out.failures else ""))
    summary = {"requested": len(ids), verb: copied, "already": already, "bytes": total}
    out.emit({"summary": {**summary, "failed": out.failures}, "archive": record.name})


def _copy_all(
    reg: Registry,
    archive: Archive,
    name: str,
    sources: list[Source],
    out: Output,
    dry_run: bool,
) -> tuple[int, int]:
    """Copies (or checks) each source; returns how many and their bytes."""
    copied = total = 0
    status = "checked" if dry_run else "copied"
    with out.progress(total_size(sources)) as advance:
        for s in sources:
            assert s.path is not None
            try:
                done = copy_resource(
                    archive, s.path, s.id, s.sha1, dry_run=dry_run, advance=advance
                )
                if not dry_run:
                    register_copy(reg, archive, done, s.id, name)
            except (errors.NbankdError, SourceReadError) as err:
                failed(out, s.id, err)
                continue
            copied, total = copied + 1, total + done.size
            where = "OK" if done.path is None else str(done.path)
            note = "" if done.verified else UNVERIFIED
            out.log(f"  - {s.id} -> {where}{note}  ({human_size(done.size)})")
            result = {"id": s.id, "status": status, "path": done.path and str(done.path)}
            out.emit({**result, "sha1": done.sha1, "verified": done.verified, "bytes": done.size})
    return copied, total


__all__ = [
    "UNVERIFIED",
    "Output",
    "copy_into",
    "failed",
    "human_size",
    "total_size",
    "unlocated",
]
