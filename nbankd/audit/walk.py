"""Walking an archive for an audit: every stored resource with its stat, and layout problems.

Read-only: folders are listed through ``O_NOATIME`` descriptors
(:func:`~nbankd.audit.reader.list_dir`) so not even their access times change,
everything else is ``lstat``, and links are never followed. Resources are found
by :meth:`~nbankd.archive.layout.Archive.iter_resources` (the layout rules live
there); their ``lstat`` (and, for folder resources, the ``lstat`` of everything
inside) runs on a few threads, which matters on NFS where each call is a round
trip. Owner, group and mode are checked on the way (:mod:`nbankd.audit.checks`)
for ``resources/``, every stub folder, every resource and ``staging/``.

Things that vanish while the walk runs (a prune, a tape import's cleanup) are
skipped, not reported unreadable. A stub folder that cannot be listed is one
finding; the rest of the archive is still walked, and the walk says which stub
folders it listed completely (what is in the others is neither missing nor gone).
Resources in the wrong stub folder, ``.NAME.partial`` transfers and ``.nfs*``
placeholders are kept apart for the caller to judge (registered here? old enough?).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nbankd import seams
from nbankd.archive.layout import Anomaly, Archive, candidate_stubs
from nbankd.archive.probe import filesystem_type
from nbankd.audit.checks import mode_policy, owners, permission_findings
from nbankd.audit.model import INCOMPLETE, UNEXPECTED, UNREADABLE, FileStat, Finding
from nbankd.audit.reader import DIR, LINK, Cancelled, Stopping, list_dir, vanished

STAT_WORKERS = 8
_CHUNK = 2048
#: filesystems whose stat cannot show an in-place rewrite that put the mtime back:
#: sshfs reports each file's mtime as its ctime (SFTP has no change time) and numbers
#: inodes by path, so the size, mtime, inode and ctime an audit caches all stay put
STAT_BLIND = frozenset({"fuse.sshfs"})


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
    #: (name, newer of mtime and ctime) of each entry in staging/
    staging: list[tuple[str, float]] = field(default_factory=list)
    #: partial transfers and NFS placeholders with their age: reported once old enough
    graced: list[tuple[Finding, float]] = field(default_factory=list)
    #: resources found in the wrong stub folder, by identifier
    misplaced: dict[str, Stored] = field(default_factory=dict)
    #: names of the stub folders that could not be listed
    unlisted_stubs: set[str] = field(default_factory=set)
    #: False when ``resources/`` itself could not be listed
    listed_top: bool = True

    def complete(self, name: str) -> bool:
        """True if the walk saw all there is where ``name`` belongs (its stub folder was
        listed, or does not exist): not finding it there means it is not stored. Every
        stub folder ``name`` may be filed in counts (:func:`candidate_stubs`: a
        one-character identifier has two)."""
        return self.listed_top and self.unlisted_stubs.isdisjoint(candidate_stubs(name))


def stat_blind(archive: Archive) -> str | None:
    """The type of the filesystem ``resources/`` is on when a file's stat there cannot
    show an in-place change (:data:`STAT_BLIND`), else None."""
    kind = filesystem_type(archive.resources_dir)
    return kind if kind in STAT_BLIND else None


def _error(err: OSError) -> str:
    return err.strerror or str(err)


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
) -> FileStat | None:
    """Checks everything inside a folder resource; its stat for the cache (None if
    the resource vanished meanwhile: pruned)."""
    size, newest, changed = 0, st.st_mtime_ns, st.st_ctime_ns
    pending = [path]
    gone = False
    while pending:
        folder = pending.pop()
        try:
            listing = sorted(list_dir(folder))
        except OSError as err:
            if vanished(err):
                gone = True
            else:
                findings.append(
                    Finding(UNREADABLE, name, Path(folder), f"unable to list: {_error(err)}")
                )
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
                if vanished(err):
                    gone = True
                else:
                    findings.append(
                        Finding(UNREADABLE, name, Path(inner), f"cannot stat: {_error(err)}")
                    )
                continue
            findings += rules.check(inner, ist, name)
            newest = max(newest, ist.st_mtime_ns)
            changed = max(changed, ist.st_ctime_ns)
            if kind == DIR:
                pending.append(inner)
            elif stat.S_ISREG(ist.st_mode):
                size += ist.st_size
    if gone and not os.path.lexists(path):
        findings.clear()  # the whole resource went (pruned): nothing to report
        return None
    return FileStat(size, newest, st.st_ino, changed)


def _resource(rules: _Rules, name: str, path: str) -> tuple[Stored | None, list[Finding]]:
    """Stats one resource (and what is inside a folder resource) and checks its modes."""
    try:
        st = os.lstat(path)
    except OSError as err:
        if vanished(err):
            return None, []  # gone since it was listed (pruned): not stored
        return None, [Finding(UNREADABLE, name, Path(path), f"cannot stat: {_error(err)}")]
    findings = rules.check(path, st, name)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fs = FileStat(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        return Stored(name, path, fs, False), findings
    if not stat.S_ISDIR(mode):  # a FIFO or device is never read, and never a copy
        findings.append(Finding(UNEXPECTED, name, Path(path), "not a regular file or folder"))
        return None, findings
    inner = _folder(rules, name, path, st, findings)
    if inner is None:
        return None, []
    return Stored(name, path, inner, True), findings


def _chunk(
    rules: _Rules, entries: Sequence[tuple[str, str]], stop: Stopping | None = None
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
            fs = FileStat(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            out.append((name, Stored(name, path, fs, False), []))
        else:
            out.append((name, *_resource(rules, name, path)))
    return out


def _link(path: Path) -> Finding | None:
    """The finding for a layout folder (``resources/``, a stub folder, ``staging/``)
    replaced by a symbolic link, which the walk never follows; None if it is no link."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return None
        target = os.readlink(path)
    except OSError:
        return None
    return Finding(
        UNEXPECTED,
        None,
        path,
        f"symbolic link to {target} in place of the folder: never followed, so nothing "
        f"in it was checked; find where the archive's own folder went, remove the link "
        f"and put that folder back at {path}",
    )


def _layout_dir(
    archive: Archive, ids: tuple[int | None, int | None], path: Path, walk: Walk
) -> bool:
    """Checks one layout folder's modes (a link in its place is a finding, never a
    mode: its mode is meaningless, and fixing modes would leave it); False if it is
    missing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        walk.layout.append(Finding(UNREADABLE, None, path, f"cannot stat: {_error(err)}"))
        return True
    if stat.S_ISLNK(st.st_mode):
        link = _link(path)
        if link is not None:
            walk.layout.append(link)
        return True
    walk.layout += permission_findings(archive, path, st, ids=ids)
    return True


def _age(path: Path) -> float | None:
    """The newer of mtime and ctime (what a transfer that is placing it refreshes);
    None if it is gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return max(st.st_mtime, st.st_ctime)


def _sort_anomalies(
    archive: Archive, rules: _Rules, anomalies: Sequence[Anomaly], walk: Walk
) -> list[Path]:
    """Files the walk's findings (or, for partial transfers and NFS placeholders, its
    ``graced`` list) from ``iter_resources``' anomalies; stats misplaced resources.
    Returns the stub folders that could not be listed (their modes are checked too)."""
    unlistable = []
    for anomaly in anomalies:
        if anomaly.kind == "unlistable":
            if anomaly.path != archive.resources_dir:
                unlistable.append(anomaly.path)
            walk.layout.append(Finding(UNREADABLE, None, anomaly.path, anomaly.reason))
        elif anomaly.kind in ("partial", "nfs"):
            age = _age(anomaly.path)
            if age is not None:
                kind = INCOMPLETE if anomaly.kind == "partial" else UNEXPECTED
                walk.graced.append((Finding(kind, None, anomaly.path, anomaly.reason), age))
        elif anomaly.kind == "misplaced" and anomaly.id is not None:
            _misplaced(rules, anomaly.id, anomaly.path, walk)
        else:
            walk.layout.append(Finding(UNEXPECTED, None, anomaly.path, anomaly.reason))
    return unlistable


def _misplaced(rules: _Rules, id: str, path: Path, walk: Walk) -> None:
    stored, findings = _resource(rules, id, str(path))
    if findings:
        walk.by_resource.setdefault(id, []).extend(findings)
    if stored is None:
        return
    first = walk.misplaced.get(id)
    if first is not None:
        walk.layout.append(
            Finding(UNEXPECTED, id, path, f"a second copy of {id} (also {first.path.name})")
        )
    else:
        walk.misplaced[id] = stored


def walk_archive(
    archive: Archive, *, workers: int = STAT_WORKERS, stop: Stopping | None = None
) -> Walk:
    """Walks ``resources/`` and ``staging/`` of ``archive`` (see the module docstring).

    Raises :class:`~nbankd.audit.reader.Cancelled` soon after ``stop`` is set."""
    walk = Walk()
    rules = _Rules(archive)
    anomalies: list[Anomaly] = []
    listed: list[Path] = []
    entries: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    first = [True]

    def lister(folder: Path) -> list[tuple[str, str]]:
        names = list_dir(folder, follow=False)  # a folder swapped for a link: unlistable
        if first[0]:
            first[0] = False
            seams.audit_pause("walk-top")
        return names

    top = _link(archive.resources_dir)
    if top is not None:  # never followed: nothing in it is checked, nor reported missing
        walk.layout.append(top)
        walk.listed_top = False
        _staging(archive, rules, walk)
        return walk
    for name, where in archive.iter_resources(anomalies, lister=lister, listed=listed):
        path = str(where)
        if name in seen:
            also = os.path.basename(seen[name])
            walk.layout.append(
                Finding(UNEXPECTED, name, where, f"a second copy of {name} (also {also})")
            )
            continue
        seen[name] = path
        entries.append((name, path))
    walk.listed_top = not any(
        a.kind == "unlistable" and a.path == archive.resources_dir for a in anomalies
    )
    unlistable = _sort_anomalies(archive, rules, anomalies, walk)
    walk.unlisted_stubs = {stub.name for stub in unlistable}
    _layout_dir(archive, rules.ids, archive.resources_dir, walk)
    for stub in [*listed, *unlistable]:
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
                walk.by_resource.setdefault(name, []).extend(findings)
    _staging(archive, rules, walk)
    return walk


def _staging(archive: Archive, rules: _Rules, walk: Walk) -> None:
    """Checks ``staging/`` and lists its entries with their age."""
    if not _layout_dir(archive, rules.ids, archive.staging_dir, walk):
        walk.layout.append(
            Finding(
                UNEXPECTED, None, archive.staging_dir, "staging/ is missing; run nbankctl init?"
            )
        )
        return
    if os.path.islink(archive.staging_dir):
        return  # reported by _layout_dir; never followed
    try:
        names = list_dir(archive.staging_dir, follow=False)
    except OSError as err:
        walk.layout.append(
            Finding(
                UNREADABLE,
                None,
                archive.staging_dir,
                f"unable to list: {_error(err)}; check its owner and mode against nbank.json",
            )
        )
        return
    for entry, _kind in names:
        age = _age(archive.staging_dir / entry)
        if age is not None:
            walk.staging.append((entry, age))
    walk.staging.sort()


__all__ = ["STAT_BLIND", "Stored", "Walk", "stat_blind", "walk_archive"]
