"""Comparing a neurobank archive on disk with the registry (``nbankctl check archive``).

Finds, as ``nbank archive check`` does: resources registered to the archive but
missing from it, files in it that the registry does not place there (missing from
the registry, or registered elsewhere, compared with the registered SHA-1 when
hashing), SHA-1 mismatches (every stored resource is read and hashed unless
``--no-hash`` is given, as nbank does: a check that skips the bytes would pass
silent corruption), resources in the wrong stub folder, owners, groups and modes
that break the archive's policy, unexpected entries under ``resources/`` and
leftovers in ``staging/``. The walk, the reads and the judgement are the daemon
audit's (:mod:`nbankd.audit.walk`, :mod:`nbankd.audit.reader`,
:mod:`nbankd.audit.compare`), and so is the bulk listing of the registry
(:func:`nbankd.audit.listing.list_registered`).

Speed: the registry's listing of the archive is what takes longest (the server's
work); the command starts it first, under a guessed name, and :func:`start` then
walks the archive and reads every stored resource on a pool of readers while the
listing runs and the registry is asked which archive this is; :meth:`Check.finish`
judges once both are in, and stops the reads of files the registry places nowhere
(nothing needs their hash; a huge stray file must not hold the check). The check
itself never writes (nor changes access times). What ``--fix`` may change is below
it: owners, groups and modes set to the archive's policy
(:mod:`nbankd.archive.access`), a missing ``staging/`` made, resources in the
wrong stub folder refiled (never replacing anything), and, only when the user
answers a question at a terminal, a leftover or a verified copy removed or a
location added.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nbankd import errors
from nbankd.archive.layout import Archive
from nbankd.archive.probe import filesystem_now
from nbankd.audit.compare import (
    by_name,
    elsewhere,
    misplaced,
    read_failure,
    staging_finding,
    walk_findings,
)
from nbankd.audit.listing import list_registered
from nbankd.audit.model import (
    HASH_MISMATCH,
    INCOMPLETE,
    MISPLACED,
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    PERMISSION,
    REGISTERED_ELSEWHERE,
    SUMMARY,
    UNEXPECTED,
    UNREADABLE,
    Finding,
)
from nbankd.audit.plan import listing_after
from nbankd.audit.reader import Cancelled, sha1_of_resource, vanished
from nbankd.audit.walk import Stored, Walk, walk_archive
from nbankd.names import printable
from nbankd.registry.base import LocationRecord, Registry, ResourceRecord
from nbankd.tape_prune import verified_elsewhere

# what --fix needs is imported where it is used: a plain check does not pay for it

#: resources read and hashed at once (reads and SHA-1 release the GIL; more did not
#: help on the 2-core bench machine, see bench/README.md)
READERS = 4


@dataclass
class Report:
    archive: str
    path: Path
    n_registered: int = 0
    n_stored: int = 0
    findings: list[Finding] = field(default_factory=list)
    hashed: bool = True
    passed: list[tuple[str, Path]] = field(default_factory=list)  # registered, stored, ok
    #: resources of ``passed`` registered with no SHA-1: their bytes had nothing to match
    unhashed: set[str] = field(default_factory=set)
    #: resources registered elsewhere whose file here matches the registered SHA-1
    verified_elsewhere: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.findings

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.findings)

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"Resources in registry: {self.n_registered}"]
        parts += [f"{label}: {sum(counts[k] for k in kinds)}" for label, kinds in SUMMARY]
        return "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "archive": self.archive,
            "path": str(self.path),
            "resources_in_registry": self.n_registered,
            "resources_stored": self.n_stored,
            "ok": self.ok,
            "hashed": self.hashed,
            "counts": {label: sum(self.counts()[k] for k in kinds) for label, kinds in SUMMARY},
            "findings": [f.to_json() for f in self.findings],
        }


#: (archive name, its listing under way): a listing the caller started early, under a
#: guessed name (the folder's, which init registers), while it asked which archive it is
Ahead = tuple[str, Future[dict[str, str | None]]]


class Check:
    """A check under way: the walk and the reads run on a pool from :func:`start`;
    :meth:`finish` compares with the registry (using ``ahead`` when its guess was
    right), :meth:`close` stops what is left."""

    def __init__(
        self,
        archive: Archive,
        *,
        check_hash: bool,
        ahead: Ahead | None = None,
        readers: int = READERS,
    ) -> None:
        self.archive = archive
        self.check_hash = check_hash
        self._ahead = ahead
        self._stop = threading.Event()
        self._dropped: frozenset[str] = frozenset()
        self._pool = ThreadPoolExecutor(max(1, readers), thread_name_prefix="nbankctl-check")
        self._reads: dict[str, Future[str]] = {}
        self._walk: Future[Walk] = self._pool.submit(self._walk_and_read)

    def _throttle(self, _n: int) -> None:
        """Reads at full speed (the user is waiting); stops when the check is closed."""
        if self._stop.is_set():
            raise Cancelled("check stopped")

    def _sha1(self, stored: Stored) -> str:
        return sha1_of_resource(stored.path, self._throttle, is_dir=stored.is_dir)[0]

    def _sha1_ahead(self, stored: Stored) -> str:
        """A read started before the registry said what is registered: it stops before
        its next block once :meth:`_drop` says nothing needs its hash."""

        def throttle(n: int) -> None:
            if stored.name in self._dropped:
                raise Cancelled(f"{stored.name}: registered nowhere, its hash is not needed")
            self._throttle(n)

        return sha1_of_resource(stored.path, throttle, is_dir=stored.is_dir)[0]

    def _walk_and_read(self) -> Walk:
        walk = walk_archive(self.archive)
        if self.check_hash and not self._stop.is_set():  # the largest first: all end together
            for stored in sorted(walk.stored.values(), key=lambda s: -s.stat.size):
                self._reads[stored.name] = self._pool.submit(self._sha1_ahead, stored)
        return walk

    def _drop(self, names: set[str]) -> None:
        """Stops the reads of files the registry places nowhere (a 1 TiB sparse stray
        would hold the check for hours): not started, they never start; under way,
        they stop before their next block."""
        self._dropped = self._dropped | names
        for name in names:
            future = self._reads.get(name)
            if future is not None:
                future.cancel()

    def _read(self, stored: Stored) -> str:
        """The SHA-1 of a stored resource: the pool's read if there was one, else now.
        Raises OSError as reading failed."""
        future = self._reads.get(stored.name)
        if future is None or stored.name in self._dropped:
            return self._sha1(stored)
        return future.result()

    def _listing(self, registry: Registry, name: str) -> dict[str, str | None]:
        if self._ahead is not None and self._ahead[0] == name:
            return self._ahead[1].result()
        return list_registered(registry, name)

    def close(self) -> None:
        """Stops the reads not yet done and waits for the pool."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def finish(self, registry: Registry, archive_name: str) -> Report:
        """Compares the archive (registered as ``archive_name``) with the registry.

        The judgement is the daemon audit's, without its grace: like ``nbank archive
        check``, every partial transfer and every ``staging/`` entry is reported.
        """
        report = Report(archive_name, self.archive.path, hashed=self.check_hash)
        listed = self._listing(registry, archive_name)
        walk = self._walk.result()
        _, lookup = misplaced(walk, listed)
        lookup += [stored for name, stored in sorted(walk.stored.items()) if name not in listed]
        known = by_name(registry.get_resources(s.name for s in lookup)) if lookup else {}
        # a file the listing missed that the registry places here (a page that vanished
        # as the list shrank meanwhile, or registered since) is judged as a listed one
        expected = listing_after(listed, archive_name, known, (s.name for s in lookup))
        lookup = [s for s in lookup if s.name not in expected]
        # before waiting on any read: readers busy with huge strays would hold it for hours
        self._drop({s.name for s in lookup if s.name not in known})
        report.n_registered = len(expected)
        report.n_stored = len(walk.stored)
        findings = walk_findings(walk)
        placed, _ = misplaced(walk, expected)
        findings += placed
        bad: set[str] = set()
        kept: list[Stored] = []
        for name, stored in sorted(walk.stored.items()):
            if name not in expected:
                continue
            kept.append(stored)
            want = expected[name]
            if want is None:
                report.unhashed.add(name)
            elif self.check_hash:
                found = self._judge(stored, want)
                if found is not None:
                    bad.add(name)
                    findings.append(found)
        report.passed = [(s.name, Path(s.where)) for s in kept if s.name not in bad]
        for name in sorted(set(expected) - set(walk.stored) - set(walk.misplaced)):
            if walk.complete(name):  # else its stub folder could not be listed: reported
                findings.append(Finding(MISSING_FROM_ARCHIVE, name, None))
        for stored in lookup:
            record = known.get(stored.name)
            if record is None:
                findings.append(Finding(MISSING_FROM_REGISTRY, stored.name, stored.path))
                continue
            finding = elsewhere(record, stored, self._read if self.check_hash else None)
            if finding is None:
                continue
            findings.append(finding)
            if finding.kind == REGISTERED_ELSEWHERE and record.sha1 and self.check_hash:
                report.verified_elsewhere.add(stored.name)
        staging = self.archive.staging_dir
        findings += [staging_finding(staging / name) for name, _ in walk.staging]
        report.findings = findings
        return report

    def _judge(self, stored: Stored, want: str) -> Finding | None:
        try:
            actual = self._read(stored)
        except OSError as err:
            if vanished(err):
                return None
            return Finding(UNREADABLE, stored.name, stored.path, read_failure(err))
        if actual != want:
            return Finding(
                HASH_MISMATCH, stored.name, stored.path, f"sha1 {actual}, registered {want}"
            )
        return None


def start(archive: Archive, *, check_hash: bool = True, ahead: Ahead | None = None) -> Check:
    """Starts walking ``archive`` and reading what it holds (see :class:`Check`)."""
    return Check(archive, check_hash=check_hash, ahead=ahead)


def check_archive(
    archive: Archive, registry: Registry, archive_name: str, *, check_hash: bool = True
) -> Report:
    """Walks, reads and judges ``archive`` in one call (see :meth:`Check.finish`)."""
    check = start(archive, check_hash=check_hash)
    try:
        return check.finish(registry, archive_name)
    finally:
        check.close()


# --- what --fix changes ---------------------------------------------------------------


def fix_misplaced(archive: Archive, report: Report) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Moves each registered resource the report found in the wrong stub folder to
    where its identifier belongs (:func:`nbankd.archive.durable.refile`); returns the
    moves made and why the others were not made (the identifier is also stored where
    it belongs, for one: both stay and the next check reports them again)."""
    from nbankd.archive import durable

    moved: list[tuple[Path, Path]] = []
    refused: list[str] = []
    for finding in report.findings:
        if finding.kind != MISPLACED or finding.path is None or finding.resource is None:
            continue
        try:
            moved.append((finding.path, durable.refile(archive, finding.path, finding.resource)))
        except errors.ArchiveError as err:
            refused.append(str(err))
    return moved, refused


def _missing_staging(archive: Archive, finding: Finding) -> bool:
    return finding.kind == UNEXPECTED and finding.path == archive.staging_dir


def _inside(archive: Archive, path: Path) -> bool:
    return path == archive.staging_dir or path.is_relative_to(archive.resources_dir)


def fix_permissions(archive: Archive, report: Report) -> tuple[list[Path], list[str]]:
    """Gives every path the report found with a wrong owner, group or mode the archive
    policy's (:func:`nbankd.archive.access.apply_access`: the policy's group when this
    user may set it, the exact mode nbankd gives; the policy's owner only as root),
    and makes a missing ``staging/``. Only paths under ``resources/`` and ``staging/``
    itself are touched, never through a symbolic link. Returns the paths now right and
    why the others are not (an owner needs root, a group needs membership)."""
    from nbankd.archive.access import apply_access, fix_access_below
    from nbankd.archive.fsops import fsync_dir
    from nbankd.audit.checks import owners, permission_findings

    fixed: list[Path] = []
    refused: list[str] = []
    uid, _gid = owners(archive)
    paths = {f.path for f in report.findings if f.kind == PERMISSION and f.path is not None}
    if any(_missing_staging(archive, f) for f in report.findings):
        try:
            os.mkdir(archive.staging_dir)
            apply_access(archive, archive.staging_dir)
            fsync_dir(archive.path)
        except OSError as err:
            refused.append(f"{archive.staging_dir}: cannot make it: {err.strerror or err}")
        else:
            fixed.append(archive.staging_dir)
    for path in sorted(paths):
        if not _inside(archive, path):
            continue
        try:
            st = fix_access_below(archive, path, uid)  # never through a swapped folder
            if st is None:
                continue  # a link: left alone
            left = list(permission_findings(archive, path, st))
        except errors.NbankdError as err:
            refused.append(f"{path}: {err}")
            continue
        except OSError as err:
            refused.append(f"{path}: {err.strerror or err}")
            continue
        if left:
            why = "; ".join(f.detail for f in left)
            refused.append(f"{path}: still {why} (an owner needs root, a group membership)")
        else:
            fixed.append(path)
    return fixed, refused


def remove_leftover(archive: Archive, path: Path) -> None:
    """Deletes a partial transfer or a ``staging/`` leftover (the user said so), never
    through a folder swapped for a link (:mod:`nbankd.archive.removal`)."""
    from nbankd.archive.removal import remove_entry

    remove_entry(archive, path)


def remove_copy(archive: Archive, path: Path) -> None:
    """Deletes a copy of a resource held elsewhere (the user said so, its SHA-1 was
    checked), then its stub folder if that is now empty; never through a folder
    swapped for a link (:mod:`nbankd.archive.removal`)."""
    from nbankd.archive.removal import remove_stored_copy

    remove_stored_copy(archive, path)


# --- asking at a terminal (--fix) --------------------------------------------------------

#: a leftover changed more recently than this may belong to a transfer under way
LEFTOVER_AGE = 3600.0


def interactive() -> bool:
    """True if the user can be asked (standard input is a terminal)."""
    return sys.stdin is not None and sys.stdin.isatty()


def _ask(prompt: str, choices: str) -> str:
    """One letter of ``choices`` typed at the terminal; "" at end of input."""
    while True:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return ""
        answer = line.strip().lower()
        if len(answer) == 1 and answer in choices:
            return answer


def _age(path: Path, now: float) -> float | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return now - max(st.st_mtime, st.st_ctime)


def _second_copy(
    record: ResourceRecord, locations: list[LocationRecord], name: str, path: Path
) -> str | None:
    """Where another copy of ``record`` is verified to be (read back here against its
    SHA-1, or on tape under a key, as ``tape prune`` needs), or None: the copy at
    ``path`` in archive ``name`` may be the only one."""
    if not record.sha1:
        return None
    for loc in locations:
        if loc.archive_name == name:
            continue
        try:
            found = verified_elsewhere(loc, record.sha1, path, check_hash=True)
        except (errors.NbankdError, OSError):
            continue  # that copy cannot be read back: not verified
        if found.ok:
            return found.why
    return None


def resolve_at_terminal(
    reg: Registry, archive: Archive, name: str, result: Report, say: Callable[[str], None]
) -> list[str]:
    """Asks at the terminal about each leftover (unchanged for :data:`LEFTOVER_AGE`)
    and each copy of a resource registered elsewhere whose SHA-1 was checked: delete
    it, or add this archive as a location. Returns what was done. Paths and names are
    said through :func:`~nbankd.names.printable`: one line each, no terminal escapes."""
    done: list[str] = []
    now: float | None = None
    for f in result.findings:
        if f.kind != INCOMPLETE or f.path is None:
            continue
        if now is None:
            # by both clocks, the younger age: never older than the archive's own says
            now = min(time.time(), filesystem_now(archive.staging_dir))
        age = _age(f.path, now)
        if age is None:
            continue
        path = printable(str(f.path))
        if age < LEFTOVER_AGE:
            say(f" - {path}: changed {age / 60:.0f} min ago, may be a transfer under way: kept")
            continue
        say(f" - {path} - {f.kind}, unchanged for {age / 3600:.1f} h")
        if _ask("   [d]elete, [s]kip? ", "ds") == "d":
            try:
                remove_leftover(archive, f.path)
            except OSError as err:
                say(f"   cannot delete {path}: {printable(err.strerror or str(err))}")
                continue
            done.append(f"deleted {path}")
    copies = [
        f
        for f in result.findings
        if f.kind == REGISTERED_ELSEWHERE and f.resource in result.verified_elsewhere and f.path
    ]
    records = {r.name: r for r in reg.get_resources(f.resource for f in copies if f.resource)}
    locations = reg.get_locations_bulk(records) if records else {}
    for f in copies:
        record = records.get(f.resource or "")
        if record is None or f.path is None or name in record.locations:
            continue
        options = []
        path, id = printable(str(f.path)), printable(record.name)
        second = _second_copy(record, locations.get(record.name, []), name, f.path)
        if second is not None:
            options.append(("d", f"[d]elete this copy (another is verified: {printable(second)})"))
        else:
            say(f" - {path}: no other copy of {id} is verified: kept")
        if f.path.parent == archive.resource_path(record.name).parent:
            options.append(("a", f"[a]dd {printable(name)} as a location"))
        if not options:
            continue
        say(f" - {path}: a copy of {id} (SHA-1 checked), {printable(f.detail)}")
        answer = _ask(f"   {', '.join(t for _, t in options)}, [s]kip? ", "das")
        try:
            if answer == "d" and second is not None:
                remove_copy(archive, f.path)
                done.append(f"deleted {path}")
            elif answer == "a" and any(k == "a" for k, _ in options):
                reg.add_location(record.name, name)
                done.append(f"added {printable(name)} as a location of {id}")
        except OSError as err:
            say(f"   cannot delete {path}: {printable(err.strerror or str(err))}")
        except errors.NbankdError as err:
            say(f"   cannot add the location: {printable(str(err))}")
    return done


__all__ = [
    "Check",
    "Finding",
    "Report",
    "check_archive",
    "fix_misplaced",
    "fix_permissions",
    "interactive",
    "remove_copy",
    "remove_leftover",
    "resolve_at_terminal",
    "start",
]
