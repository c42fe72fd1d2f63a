"""Walking an archive for an audit: every stored resource with its stat, and layout problems.

Read-only: folders are listed through ``O_NOATIME`` descriptors
(:func:`~nbankd.audit.reader.list_dir`) so not even their access times change,
everything else is ``lstat``, and links are never followed. Resources are found
by the layout rules of :meth:`~nbankd.archive.layout.Archive.iter_resources`
(stub folder = first two characters of the identifier, ``.*.partial`` = an
incomplete transfer, links and misplaced files are anomalies); their ``lstat``
(and, for folder resources, the ``lstat`` of everything inside) runs on a few
threads, which matters on NFS where each call is a round trip. Owner, group and
mode are checked on the way (:mod:`nbankd.audit.checks`) for ``resources/``,
every stub folder, every resource and ``staging/``.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nbankd.archive.layout import Anomaly, Archive
from nbankd.audit.checks import mode_policy, owners, permission_findings
from nbankd.audit.model import INCOMPLETE, UNEXPECTED, UNREADABLE, FileStat, Finding
from nbankd.audit.reader import DIR, LINK, Cancelled, list_dir

STAT_WORKERS = 8
_CHUNK = 2048


@dataclass(frozen=True)
class Stored:
    """A resource found in ``resources/`` (its path kept as text: 100k Path objects cost
    seconds; :attr:`path` makes one when needed)."""

    name: str
    where: str
    stat: FileStat
    is_dir: bool

    @property
    def path(self) -> Path:
        return Path(self.where)


@dataclass
class Walk:
    """What one walk of an archive found."""

    stored: dict[str, Stored] = field(default_factory=dict)
    #: problems not tied to one resource (layout folders, stray entries, duplicates)
    layout: list[Finding] = field(default_factory=list)
    #: permission and unreadable findings of each resource, dropped if it is in flight
    by_resource: dict[str, list[Finding]] = field(default_factory=dict)
    #: (name, mtime) of each entry in staging/
    staging: list[tuple[str, float]] = field(default_factory=list)


def _anomaly_finding(anomaly: Anomaly) -> Finding:
    if anomaly.reason.startswith("unable to list"):
        kind = UNREADABLE
    elif "incomplete" in anomaly.reason:
        kind = INCOMPLETE
    else:
        kind = UNEXPECTED
    return Finding(kind, None, anomaly.path, anomaly.reason)


def _error(err: OSError) -> str:
    return err.strerror or str(err)


def _stem(name: str) -> str:
    """``PurePath(name).stem``, without making a path."""
    i = name.rfind(".")
    return name[:i] if 0 < i < len(name) - 1 else name


class _Rules:
    """The archive's owner and mode rules for things inside resources, checked cheaply;
    only a path that breaks them goes through :func:`permission_findings` for the detail."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.ids = owners(archive)
        probe = archive.resources_dir / "xx" / "xx"
        self.file = mode_policy(archive, probe, is_dir=False)
        self.dir = mode_policy(archive, probe, is_dir=True)

    def check(self, path: str, st: os.stat_result, name: str) -> list[Finding]:
        uid, gid = self.ids
        required, forbidden = self.dir if stat.S_ISDIR(st.st_mode) else self.file
        have = stat.S_IMODE(st.st_mode)
        if (
            (uid is None or st.st_uid == uid)
            and (gid is None or st.st_gid == gid)
            and not required & ~have
            and not have & forbidden
        ):
            return []
        return list(permission_findings(self.archive, Path(path), st, name, ids=self.ids))


def _folder(
    rules: _Rules, name: str, path: str, st: os.stat_result, findings: list[Finding]
) -> FileStat:
    """Checks everything inside a folder resource; its stat for the cache."""
    size, newest = 0, st.st_mtime_ns
    pending = [path]
    while pending:
        folder = pending.pop()
        try:
            listing = sorted(list_dir(folder))
        except OSError as err:
            findings.append(Finding(UNREADABLE, name, Path(folder), _error(err)))
            continue
        for entry, kind in listing:
            inner = os.path.join(folder, entry)
            if kind == LINK:
                findings.append(
                    Finding(UNEXPECTED, name, Path(inner), "symbolic link inside a resource")
                )
                continue
            try:
                ist = os.lstat(inner)
            except OSError as err:
                findings.append(Finding(UNREADABLE, name, Path(inner), _error(err)))
                continue
            findings += rules.check(inner, ist, name)
            newest = max(newest, ist.st_mtime_ns)
            if kind == DIR:
                pending.append(inner)
            elif stat.S_ISREG(ist.st_mode):
                size += ist.st_size
    return FileStat(size, newest, st.st_ino)


def _resource(rules: _Rules, name: str, path: str) -> tuple[Stored | None, list[Finding]]:
    """Stats one resource (and what is inside a folder resource) and checks its modes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, []  # gone since it was listed (pruned): not stored
    except OSError as err:
        return None, [Finding(UNREADABLE, name, Path(path), _error(err))]
    findings = rules.check(path, st, name)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return Stored(name, path, FileStat(st.st_size, st.st_mtime_ns, st.st_ino), False), findings
    if not stat.S_ISDIR(mode):  # a FIFO or device is never read, and never a copy
        findings.append(Finding(UNEXPECTED, name, Path(path), "not a regular file or folder"))
        return None, findings
    return Stored(name, path, _folder(rules, name, path, st, findings), True), findings


def _chunk(
    rules: _Rules, entries: Sequence[tuple[str, str]], stop: threading.Event | None = None
) -> list[tuple[str, Stored | None, list[Finding]]]:
    """Stats a run of resources: the common case (a regular file with the right owner
    and mode) inline, anything else through :func:`_resource`. This loop is most of
    an incremental audit's time on 100k resources."""
    out: list[tuple[str, Stored | None, list[Finding]]] = []
    lstat, is_reg, imode = os.lstat, stat.S_ISREG, stat.S_IMODE
    uid, gid = rules.ids
    required, forbidden = rules.file
    if stop is not None and stop.is_set():
        raise Cancelled("audit stopped")
    for name, path in entries:
        try:
            st = lstat(path)
        except OSError:
            out.append((name, *_resource(rules, name, path)))
            continue
        mode = st.st_mode
        have = imode(mode)
        if (
            is_reg(mode)
            and (uid is None or st.st_uid == uid)
            and (gid is None or st.st_gid == gid)
            and not required & ~have
            and not have & forbidden
        ):
            fs = FileStat(st.st_size, st.st_mtime_ns, st.st_ino)
            out.append((name, Stored(name, path, fs, False), []))
        else:
            out.append((name, *_resource(rules, name, path)))
    return out


def _layout_dir(
    archive: Archive, ids: tuple[int | None, int | None], path: Path, walk: Walk
) -> bool:
    """Checks one layout folder's modes; False if it is missing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        walk.layout.append(Finding(UNREADABLE, None, path, _error(err)))
        return True
    walk.layout += permission_findings(archive, path, st, ids=ids)
    return True


def _listing(base: Path, anomalies: list[Anomaly]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(stub folders, (id, path) of each well-placed resource), by the layout rules of
    ``Archive.iter_resources``; everything else goes to ``anomalies``."""
    try:
        top = sorted(list_dir(base))
    except OSError as err:
        anomalies.append(Anomaly(base, f"unable to list: {_error(err)}"))
        return [], []
    stubs: list[Path] = []
    found: list[tuple[str, str]] = []
    for stub_name, kind in top:
        stub = base / stub_name
        if kind != DIR:
            anomalies.append(Anomaly(stub, "not a stub folder"))
            continue
        stubs.append(stub)
        prefix = f"{stub}/"
        try:
            entries = sorted(list_dir(stub))
        except OSError as err:
            anomalies.append(Anomaly(stub, f"unable to list: {_error(err)}"))
            continue
        for entry, entry_kind in entries:
            id = _stem(entry)
            if entry.startswith(".") and entry.endswith(".partial"):
                anomalies.append(Anomaly(stub / entry, "left over from an incomplete transfer"))
            elif entry_kind == LINK:
                anomalies.append(Anomaly(stub / entry, "symbolic link"))
            elif id[:2] != stub_name:
                anomalies.append(
                    Anomaly(stub / entry, f"in the wrong stub folder (expected {id[:2]})")
                )
            else:
                found.append((id, prefix + entry))
    return stubs, found


def walk_archive(
    archive: Archive, *, workers: int = STAT_WORKERS, stop: threading.Event | None = None
) -> Walk:
    """Walks ``resources/`` and ``staging/`` of ``archive`` (see the module docstring).

    Raises :class:`~nbankd.audit.reader.Cancelled` soon after ``stop`` is set."""
    walk = Walk()
    rules = _Rules(archive)
    anomalies: list[Anomaly] = []
    entries: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    stubs, listed = _listing(archive.resources_dir, anomalies)
    for name, path in listed:
        if name in seen:
            also = os.path.basename(seen[name])
            walk.layout.append(
                Finding(UNEXPECTED, name, Path(path), f"a second copy of {name} (also {also})")
            )
            continue
        seen[name] = path
        entries.append((name, path))
    walk.layout += [_anomaly_finding(a) for a in anomalies]
    _layout_dir(archive, rules.ids, archive.resources_dir, walk)
    for stub in stubs:
        _layout_dir(archive, rules.ids, stub, walk)
    chunks = [entries[i : i + _CHUNK] for i in range(0, len(entries), _CHUNK)]
    if len(chunks) > 1 and workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="audit-stat") as pool:
            parts = list(pool.map(lambda c: _chunk(rules, c, stop), chunks))
    else:
        parts = [_chunk(rules, c, stop) for c in chunks]
    for part in parts:
        for name, stored, findings in part:
            if stored is not None:
                walk.stored[name] = stored
            if findings:
                walk.by_resource[name] = findings
    if not _layout_dir(archive, rules.ids, archive.staging_dir, walk):
        walk.layout.append(
            Finding(
                UNEXPECTED, None, archive.staging_dir, "staging/ is missing; run nbankctl init?"
            )
        )
        return walk
    try:
        for entry, _kind in list_dir(archive.staging_dir):
            try:
                mtime = os.lstat(archive.staging_dir / entry).st_mtime
            except FileNotFoundError:
                continue
            walk.staging.append((entry, mtime))
    except OSError as err:
        walk.layout.append(Finding(UNREADABLE, None, archive.staging_dir, _error(err)))
    walk.staging.sort()
    return walk


__all__ = ["Stored", "Walk", "walk_archive"]
