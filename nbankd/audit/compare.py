"""Judging what a walk found, shared by the daemon's audits and ``nbankctl archive check``.

The semantics follow ``nbank archive check`` (neurobank 0.13, ``nbank.check``):

- a file of a resource registered to this archive but in the wrong stub folder is
  one finding, ``misplaced`` (not also "missing from archive");
- a second file for the same resource is ``unexpected`` (nbank: duplicate);
- a file whose resource is registered, but not to this archive, is compared with
  the registered SHA-1 (as nbank's ``recheck_unregistered`` does): ``registered
  elsewhere`` when it matches (or the registry has no hash), ``changed
  elsewhere`` when it does not;
- partial transfers and NFS placeholders count once they are older than the grace
  (a transfer may be writing them right now).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from nbankd import errors
from nbankd.archive.layout import Archive, stored_file
from nbankd.audit.model import (
    CHANGED_ELSEWHERE,
    HASH_MISMATCH,
    INCOMPLETE,
    MISPLACED,
    REGISTERED_ELSEWHERE,
    UNEXPECTED,
    UNREADABLE,
    Finding,
    young,
)
from nbankd.audit.reader import list_dir, vanished
from nbankd.audit.walk import Stored, Walk
from nbankd.hashing import NameNotUtf8
from nbankd.registry.base import ResourceRecord

if TYPE_CHECKING:  # the daemon's reads; a check imports none of them
    from nbankd.audit.hashrun import ReadOutcome


def walk_findings(
    walk: Walk, *, skip: Container[str] = (), now: float = 0.0, grace: float = 0.0
) -> list[Finding]:
    """Layout findings, each resource's own findings (except for names in ``skip``:
    in flight), and partial transfers and NFS placeholders older than ``grace`` at
    ``now`` (every one of them with no grace)."""
    out = list(walk.layout)
    for name, found in walk.by_resource.items():
        if name not in skip:
            out += found
    out += [f for f, age in walk.graced if grace <= 0 or not young(age, now=now, grace=grace)]
    return out


def misplaced(
    walk: Walk, registered: Container[str], *, skip: Container[str] = ()
) -> tuple[list[Finding], list[Stored]]:
    """(findings, files to look up in the registry) for resources in a wrong stub folder.

    Registered to this archive: ``misplaced``. Also stored where it belongs: a second
    copy. Neither: the caller looks it up like any unregistered file.
    """
    findings: list[Finding] = []
    lookup: list[Stored] = []
    for name, stored in sorted(walk.misplaced.items()):
        if name in skip:
            continue
        proper = walk.stored.get(name)
        if proper is not None:
            also = proper.path.name
            findings.append(
                Finding(UNEXPECTED, name, stored.path, f"a second copy of {name} (also {also})")
            )
        elif name in registered:
            findings.append(
                Finding(
                    MISPLACED,
                    name,
                    stored.path,
                    f"in the wrong stub folder: it belongs in {_stub_of(name)}/",
                )
            )
        else:
            lookup.append(stored)
    return findings, lookup


def _stub_of(name: str) -> Path:
    """``resources/<stub>``, relative to the archive: where the resource ``name`` is
    filed (:func:`~nbankd.archive.layout.stored_file`)."""
    return stored_file(Path(), name, name).parent


def read_failure(err: OSError, doing: str = "") -> str:
    """What an ``unreadable`` finding says: for a folder holding a file named with bytes
    that are not UTF-8 (no neurobank hash covers it), that it is not verifiable and
    which file, as ``nbankctl verify`` says; else the error, then ``doing``."""
    if isinstance(err, NameNotUtf8):
        return f"not verifiable: '{err.filename}' is {err.strerror}"
    return f"{err.strerror or err}{doing}"


def elsewhere(
    record: ResourceRecord, stored: Stored, sha1_of: Callable[[Stored], str] | None
) -> Finding | None:
    """The finding for a file whose resource is registered, but not to this archive.

    ``sha1_of`` reads the file (None: contents are not compared). None when the file
    vanished while being read.
    """
    where = ", ".join(record.locations)
    detail = f"located in: {where}" if where else "the registry lists no locations"
    if record.sha1 is None:
        return Finding(
            REGISTERED_ELSEWHERE, record.name, stored.path, f"{detail}; no registered hash"
        )
    if sha1_of is None:
        return Finding(REGISTERED_ELSEWHERE, record.name, stored.path, detail)
    try:
        actual = sha1_of(stored)
    except OSError as err:
        if vanished(err):
            return None
        return Finding(UNREADABLE, record.name, stored.path, read_failure(err))
    if actual != record.sha1.lower():
        return Finding(
            CHANGED_ELSEWHERE,
            record.name,
            stored.path,
            f"{detail}; sha1 {actual}, registered {record.sha1.lower()}",
        )
    return Finding(REGISTERED_ELSEWHERE, record.name, stored.path, detail)


def staging_finding(path: Path) -> Finding:
    """A leftover in ``staging/``."""
    return Finding(
        INCOMPLETE, None, path, "left in staging/ by an interrupted transfer; safe to delete"
    )


def by_name(records: Iterable[ResourceRecord]) -> dict[str, ResourceRecord]:
    return {r.name: r for r in records}


def judge_reads(
    results: Mapping[str, ReadOutcome], expected: Mapping[str, str | None], walk: Walk
) -> list[Finding]:
    """Findings of the reads of registered resources (``expected``: name -> registered
    SHA-1): a hash that differs, or a file that could not be read (not one that
    vanished: a prune). A file that changed while read gets no verdict."""
    out = []
    for name in sorted(results.keys() & expected.keys()):
        got, want, path = results[name], expected[name], walk.stored[name].path
        if isinstance(got, OSError):
            if not vanished(got):
                out.append(Finding(UNREADABLE, name, path, read_failure(got, " while reading it")))
        elif got.unchanged and want is not None and got.sha1 != want:
            out.append(Finding(HASH_MISMATCH, name, path, f"sha1 {got.sha1}, registered {want}"))
    return out


def registered_within(record: ResourceRecord | None, *, now: float, grace: float) -> bool:
    """True if the registry created ``record`` less than ``grace`` seconds before ``now``
    (a ``created_on`` without a zone is taken as UTC, as django-neurobank writes it)."""
    if record is None or not record.created_on:
        return False
    try:
        created = datetime.fromisoformat(record.created_on)
    except ValueError:
        return False
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return young(created.timestamp(), now=now, grace=grace)


def stored_now(archive: Archive, name: str) -> bool:
    """True if ``resources/`` holds an entry for ``name`` now, under any one extension
    (``name`` or ``name.EXT``: the stem is the identifier, as the walk reads names, so
    ``name.dat.bak`` is not it), listing the stub folder without touching its atime; a
    folder that cannot be listed now counts as holding it (the walk listed it; nothing
    is reported on a guess)."""
    try:
        entries = archive.stored_entries(name, lister=list_dir)
    except errors.NbankdError:
        return True
    return any(entry.stem == name for entry in entries)


__all__ = [
    "by_name",
    "elsewhere",
    "judge_reads",
    "misplaced",
    "read_failure",
    "registered_within",
    "staging_finding",
    "stored_now",
    "walk_findings",
]
