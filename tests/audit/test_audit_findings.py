"""Each kind of problem planted into a real archive is found exactly once, against the
embedded registry and the real django-neurobank server, and the audit changes nothing."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fixtures.cli_backends import Backend, sha1, store
from fixtures.django_server import DjangoServer
from nbankd.archive.access import apply_access
from nbankd.archive.layout import Archive
from nbankd.audit.cache import AuditCache
from nbankd.audit.listing import list_registered
from nbankd.audit.model import (
    CHANGED_ELSEWHERE,
    HASH_MISMATCH,
    INCOMPLETE,
    MISPLACED,
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    NO_LOCATION,
    PERMISSION,
    REGISTERED_ELSEWHERE,
    UNEXPECTED,
    AuditReport,
)
from nbankd.audit.run import Auditor, AuditSettings, AuditTarget

OLD = 1_000_000_000  # 2001: older than any staging grace


@dataclass
class Planted:
    archive: Archive
    name: str
    good: list[str]
    expected: set[tuple[str, str | None, str | None]]  # (kind, resource, path)


def plant(backend: Backend) -> Planted:
    """An archive with clean resources and one of each kind of problem."""
    archive, arch = backend.archive()
    _other, other_name = backend.archive("other")
    good = []
    for i in range(3):
        data = backend.blob(f"good{i}")
        name = backend.resource(data, arch)
        store(archive, name, data)
        good.append(name)
    gone = backend.resource(backend.blob("gone"), arch)
    store(archive, gone, backend.blob("gone")).unlink()  # delete a file
    ghost = backend.resource(backend.blob("ghost"), arch)  # a record without a file
    flip = backend.resource(backend.blob("flip"), arch)
    flipped = bytearray(backend.blob("flip"))
    flipped[3] ^= 0x01
    store(archive, flip, bytes(flipped))  # flip a byte
    stray = backend.name("stray")
    stray_path = store(archive, stray, backend.blob("stray"))  # a file nobody registered
    elsewhere = backend.resource(backend.blob("elsewhere"), other_name)
    elsewhere_path = store(archive, elsewhere, backend.blob("elsewhere"))
    perm = backend.resource(backend.blob("perm"), arch)
    perm_path = store(archive, perm, backend.blob("perm"))
    perm_path.chmod(0o644)  # writable in a read-only archive
    outside = archive.resources_dir / "notes.txt"
    outside.write_text("not a resource")  # outside the two-character folders
    leftover = archive.staging_dir / ".nbankd-0123456789abcdef0123456789abcdef"
    leftover.write_bytes(b"partial copy")
    os.utime(leftover, (OLD, OLD))  # left by a crash long ago
    backend.registry.add_archive(backend.name("tape"), "tape", f"/tape/{arch}", "offline")
    flip_path = archive.stored_path(flip)
    expected = {
        (MISSING_FROM_ARCHIVE, gone, None),
        (MISSING_FROM_ARCHIVE, ghost, None),
        (HASH_MISMATCH, flip, str(flip_path)),
        (MISSING_FROM_REGISTRY, stray, str(stray_path)),
        (REGISTERED_ELSEWHERE, elsewhere, str(elsewhere_path)),
        (PERMISSION, perm, str(perm_path)),
        (UNEXPECTED, None, str(outside)),
        (INCOMPLETE, None, str(leftover)),
    }
    return Planted(archive, arch, good, expected)


def found(report: AuditReport) -> list[tuple[str, str | None, str | None]]:
    [result] = report.archives
    return [(f.kind, f.resource, None if f.path is None else str(f.path)) for f in result.findings]


def tree(root: Path) -> list[Path]:
    return sorted(Path(d, n) for d, ds, fs in os.walk(root) for n in [*ds, *fs])


def contents(paths: list[Path]) -> dict[Path, str]:
    return {
        p: hashlib.sha1(p.read_bytes()).hexdigest()
        for p in paths
        if stat.S_ISREG(os.lstat(p).st_mode)
    }


def stats(paths: list[Path]) -> dict[Path, tuple[int, int, int, int, int, int]]:
    """lstat only (no listing, no reading): mode, owner, group, size, mtime, atime."""
    out = {}
    for p in paths:
        st = os.lstat(p)
        out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_atime_ns)
    return out


GRACE = 600.0


def later() -> float:
    """The audit's clock: past the grace, as if the problems were planted long ago (a
    file's ctime, which the grace also looks at, cannot be set back)."""
    return time.time() + 2 * GRACE


def auditor(backend: Backend, tmp_path: Path, scrub_days: int = 30) -> Auditor:
    cache = AuditCache(tmp_path / "audit-cache.sqlite3")
    settings = AuditSettings(staging_grace=GRACE, scrub_days=scrub_days)
    return Auditor(backend.registry, cache, settings=settings, clock=later)


def test_each_planted_problem_is_found_exactly_once(backend: Backend, tmp_path: Path) -> None:
    """Deleted file, flipped byte, stray file, record without file, file registered
    elsewhere, chmod, stray entry in resources/ and a staging leftover: each one finding."""
    p = plant(backend)
    report = auditor(backend, tmp_path).run(
        [AuditTarget(p.name, p.archive.path)], full=True, report_dir=tmp_path / "audits"
    )
    assert report.error is None
    assert Counter(found(report)) == Counter(p.expected)
    [result] = report.archives
    assert result.stored == 7 and result.registered_before == result.registered_after == 7
    assert not report.ok and len(result.findings) == 8
    assert result.summary().endswith(
        "missing from archive: 2; missing from registry: 1; read/verify errors: 1; "
        "other layout errors: 2; permission errors: 1; registered elsewhere: 1"
    )
    offline = [o for o in report.not_audited if o.root == f"/tape/{p.name}"]
    assert [(o.scheme, o.accessibility) for o in offline] == [("tape", "offline")]


def test_incremental_audit_keeps_finding_the_same_problems(
    backend: Backend, tmp_path: Path
) -> None:
    """A second, incremental audit (no scrub slice) reports the same findings and
    re-reads only the mismatched resource (to confirm it), not the unchanged ones.
    The first reads the stray and the copy registered elsewhere too: reading starts
    before the registry's listing says what is registered here."""
    p = plant(backend)
    audit = auditor(backend, tmp_path, scrub_days=0)
    target = [AuditTarget(p.name, p.archive.path)]
    first = audit.run(target, full=True)
    second = audit.run(target)
    assert Counter(found(second)) == Counter(found(first)) == Counter(p.expected)
    assert first.archives[0].hashed == 7  # good x3, flip, perm, stray, elsewhere
    assert second.archives[0].hashed == 1  # flip, to confirm the mismatch


def test_audit_changes_nothing_in_the_archive(backend: Backend, tmp_path: Path) -> None:
    """A full audit leaves every path's mode, owner, size, mtime, bytes and even atime
    (set older than mtime, which relatime would refresh on any read or listing)."""
    p = plant(backend)
    paths = tree(p.archive.path)
    before_bytes = contents(paths)
    for path in [p.archive.path, *paths]:
        st = os.lstat(path)
        os.utime(path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns), follow_symlinks=False)
    # nbank.json is left out: every deposit and rescan reads it to find the policy
    watched = [path for path in paths if path.name != "nbank.json"]
    before = stats(watched)
    auditor(backend, tmp_path).run([AuditTarget(p.name, p.archive.path)], full=True)
    assert stats(watched) == before
    assert tree(p.archive.path) == paths
    assert contents(paths) == before_bytes


def test_clean_archive_gives_a_clean_report(backend: Backend, tmp_path: Path) -> None:
    """Resources stored as deposits store them, all registered: no finding at all."""
    archive, arch = backend.archive()
    for i in range(4):
        data = backend.blob(f"clean{i}")
        store(archive, backend.resource(data, arch), data)
    report = auditor(backend, tmp_path).run([AuditTarget(arch, archive.path)], full=True)
    # the archive is clean (the shared django registry may hold other tests' location-less
    # resources: registry-wide findings, not this archive's)
    assert report.archives[0].ok and found(report) == []
    assert report.archives[0].hashed == 4


def test_nbank_parity_misplaced_changed_elsewhere_no_location_hidden(
    backend: Backend, tmp_path: Path
) -> None:
    """As nbank's check has it: a registered file in the wrong stub folder is one
    'misplaced' finding (not also missing); a file registered elsewhere with other bytes
    is 'changed elsewhere', one whose record has no hash 'registered elsewhere'; a
    resource no archive holds is a registry finding; a dot-file is named as hidden."""
    archive, arch = backend.archive()
    _other, other = backend.archive("other")
    placed = backend.resource(backend.blob("placed"), arch)
    wrong = archive.resources_dir / "zz"
    wrong.mkdir()
    apply_access(archive, wrong)
    wrong_path = wrong / f"{placed}.dat"
    wrong_path.write_bytes(backend.blob("placed"))
    apply_access(archive, wrong_path)
    changed = backend.resource(backend.blob("changed"), other)
    changed_path = store(archive, changed, backend.blob("changed") + b"!")
    nohash = backend.resource(backend.blob("nohash"), other, hashed=False)
    nohash_path = store(archive, nohash, backend.blob("nohash"))
    homeless = backend.resource(backend.blob("homeless"), None)
    hidden = changed_path.parent / ".DS_Store"
    hidden.write_bytes(b"finder")
    report = auditor(backend, tmp_path).run([AuditTarget(arch, archive.path)], full=True)
    assert Counter(found(report)) == Counter(
        {
            (MISPLACED, placed, str(wrong_path)): 1,
            (CHANGED_ELSEWHERE, changed, str(changed_path)): 1,
            (REGISTERED_ELSEWHERE, nohash, str(nohash_path)): 1,
            (UNEXPECTED, None, str(hidden)): 1,
        }
    )
    details = {f.kind: f.detail for f in report.archives[0].findings}
    assert details[MISPLACED] == f"in the wrong stub folder: it belongs in resources/{placed[:2]}/"
    assert details[CHANGED_ELSEWHERE].startswith(f"located in: {other}; sha1 ")
    assert details[REGISTERED_ELSEWHERE] == f"located in: {other}; no registered hash"
    assert details[UNEXPECTED].startswith("hidden file: not a resource")
    assert (
        report.archives[0]
        .summary()
        .endswith("other layout errors: 2; permission errors: 0; registered elsewhere: 2")
    )
    mine = [f for f in report.registry_findings if f.resource == homeless]
    assert [(f.kind, f.path) for f in mine] == [(NO_LOCATION, None)]


def test_unmounted_archive_is_an_error_not_a_crash(backend: Backend, tmp_path: Path) -> None:
    """An archive folder without nbank.json is reported unavailable with the reason."""
    archive, arch = backend.archive()
    (archive.path / "nbank.json").rename(archive.path / "nbank.json.away")
    report = auditor(backend, tmp_path).run([AuditTarget(arch, archive.path)])
    [result] = report.archives
    assert result.state == "unavailable" and "nbank.json" in (result.error or "")
    assert not report.ok


def test_django_listing_fetches_every_page(
    django_backend: Backend, django_registry: DjangoServer
) -> None:
    """An archive with more resources than a page holds (100) is listed completely."""
    backend = django_backend
    _archive, arch = backend.archive()
    names = [f"pg{os.urandom(4).hex()}{i}" for i in range(230)]
    django_registry.shell(
        "from django.contrib.auth.models import User\n"
        "from nbank_registry.models import Archive, DataType, Location, Resource\n"
        f"a = Archive.objects.get(name={arch!r})\n"
        f"d = DataType.objects.get(name={backend.dtype!r})\n"
        "u = User.objects.filter(is_superuser=True).first()\n"
        f"names = {names!r}\n"
        "Resource.objects.bulk_create("
        "[Resource(name=n, dtype=d, created_by=u) for n in names])\n"
        "rs = Resource.objects.filter(name__in=names)\n"
        "Location.objects.bulk_create([Location(resource=r, archive=a) for r in rs])\n"
    )
    hashed = backend.resource(b"one with a hash", arch)
    listed = list_registered(backend.registry, arch)
    assert sorted(listed) == sorted([*names, hashed])
    assert listed[hashed] == sha1(b"one with a hash")
    assert {listed[n] for n in names} == {None}
