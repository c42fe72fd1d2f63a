"""Audits against a moving archive, and as a user who cannot read everything: a prune
during the walk, a writer during a read, transfers still being placed, a registry outage,
files and stub folders the auditing user cannot read."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from audit_helpers import Setup, make_setup

from fixtures.cli_backends import Backend, sha1, store
from fixtures.daemon import wait_for
from fixtures.users import TestUser
from nbankctl import render
from nbankd.audit.cache import AuditCache
from nbankd.audit.model import (
    INCOMPLETE,
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    PERMISSION,
    UNREADABLE,
    AuditReport,
)
from nbankd.audit.run import Auditor
from nbankd.audit.settings import AuditSettings, AuditTarget
from nbankd.hashing import BLOCK_SIZE
from nbankd.registry.http import HttpRegistry

OLD = 1_000_000_000.0
GRACE = 600.0


def kinds(report: AuditReport) -> Counter[tuple[str, str | None, str | None]]:
    [result] = report.archives
    return Counter((f.kind, f.resource, f.path and str(f.path)) for f in result.findings)


def held_at(
    point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, audit: Auditor, s: Setup
) -> tuple[threading.Thread, dict[str, AuditReport], Path]:
    """Starts a full audit in a thread that pauses at ``point``; returns (thread, result
    holder, the file whose creation lets it go on) once it is there."""
    go = tmp_path / f"go-{point}"
    monkeypatch.setenv("NBANKD_AUDIT_PAUSE_AT", point)
    monkeypatch.setenv("NBANKD_AUDIT_PAUSE_UNTIL", str(go))
    out: dict[str, AuditReport] = {}
    thread = threading.Thread(target=lambda: out.update(report=audit.run([s.target], full=True)))
    thread.start()
    wait_for(Path(f"{go}.reached").exists, what=f"the audit to reach {point}")
    return thread, out, go


def add(s: Setup, name: str, data: bytes) -> Path:
    s.registry.add_resource(dtype="dat", archive="arch", name=name, sha1=sha1(data))
    return store(s.archive, name, data)


def test_prune_during_the_walk_is_not_a_finding(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stub folder pruned (files deleted, locations removed) after the walk listed
    resources/ but before it listed that folder: no 'unreadable', nothing missing."""
    for name in ("ab001", "ab002"):
        add(setup, name, name.encode() * 50)
    audit = Auditor(setup.registry, AuditCache(tmp_path / "cache.sqlite3"))
    thread, out, go = held_at("walk-top", tmp_path, monkeypatch, audit, setup)
    shutil.rmtree(setup.archive.resources_dir / "ab")
    for name in ("ab001", "ab002"):
        setup.registry.remove_location(name, "arch")
    go.touch()
    thread.join(60)
    report = out["report"]
    assert kinds(report) == Counter() and report.ok
    # the listing runs beside the walk: it saw the two pruned resources or not
    assert report.archives[0].stored == 12


def test_file_rewritten_while_read_gets_no_verdict_until_it_settles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer rewriting a resource in place (same bytes, not atomically) while the audit
    reads it: no hash mismatch that run (it changed while being read); the next run reads
    it again, as changed, and finds it intact."""
    s = make_setup(tmp_path, n=0)
    data = os.urandom(BLOCK_SIZE + 5000)  # two blocks: the pause comes after the first
    path = add(s, "big01", data)
    cache = AuditCache(tmp_path / "cache.sqlite3")
    settings = AuditSettings(scrub_days=0, max_mb_per_s=0, workers=1)
    assert Auditor(s.registry, cache, settings=settings).run([s.target]).ok
    audit = Auditor(s.registry, cache, settings=settings)
    thread, out, go = held_at("reading", tmp_path, monkeypatch, audit, s)
    with open(path, "r+b") as f:  # the writer has truncated and written a little so far
        f.truncate(0)
        f.write(data[:1000])
    go.touch()
    thread.join(60)
    assert kinds(out["report"]) == Counter() and out["report"].archives[0].hashed == 1
    with open(path, "r+b") as f:  # the writer finishes: the same bytes as before
        f.seek(1000)
        f.write(data[1000:])
    monkeypatch.delenv("NBANKD_AUDIT_PAUSE_AT")
    again = Auditor(s.registry, cache, settings=settings).run([s.target])
    assert again.ok and again.archives[0].hashed == 1  # read again: it changed
    s.registry.close()


def test_transfers_being_placed_are_not_reported_within_the_grace(
    backend: Backend, tmp_path: Path
) -> None:
    """What a transfer is placing right now is left alone within the grace, judged by
    ctime: an unregistered file with an old mtime (a tape import registers after it
    extracts), a .NAME.partial file, a staging/ entry. Past the grace, one finding each."""
    archive, arch = backend.archive()
    name = backend.name("tar")
    path = store(archive, name, backend.blob("tar"))
    os.utime(path, (OLD, OLD))  # the mtime recorded in the tar
    partial = path.parent / f".{backend.name('tr')}.dat.partial"
    partial.write_bytes(b"half a copy")
    staged = archive.staging_dir / "import.tmp"
    staged.write_bytes(b"being unpacked")
    os.utime(staged, (OLD, OLD))
    target = [AuditTarget(arch, archive.path)]
    settings = AuditSettings(staging_grace=GRACE)
    now = Auditor(backend.registry, AuditCache(tmp_path / "c1.sqlite3"), settings=settings)
    assert kinds(now.run(target)) == Counter()
    later = Auditor(
        backend.registry,
        AuditCache(tmp_path / "c2.sqlite3"),
        settings=settings,
        clock=lambda: partial.stat().st_ctime + 2 * GRACE,
    )
    assert kinds(later.run(target)) == Counter(
        {
            (MISSING_FROM_REGISTRY, name, str(path)): 1,
            (INCOMPLETE, None, str(partial)): 1,
            (INCOMPLETE, None, str(staged)): 1,
        }
    )


def test_registry_outage_is_an_error_with_its_code(setup: Setup, tmp_path: Path) -> None:
    """With the registry unreachable, each archive and the report carry the error and the
    code registry-unavailable, nothing is a finding, and the report says it was an outage
    (nbankctl audit exits 3 on it, not 1)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    down = HttpRegistry(f"http://127.0.0.1:{port}/neurobank/")
    report = Auditor(down, AuditCache(tmp_path / "cache.sqlite3")).run([setup.target])
    [result] = report.archives
    assert result.error_code == report.error_code == "registry-unavailable"
    assert report.findings == 0 and not report.ok and report.registry_outage()
    data = report.to_json()
    assert data["registry_outage"] is True and data["problem_count"] == 2
    assert "registry unreachable" in render.audit(data).splitlines()[0]
    status = render.audit_line({"last_audit": report.summary_json(), "next_audit": None})
    assert "FAILED" in status


def test_unavailable_archive_counts_as_a_problem_in_status(setup: Setup, tmp_path: Path) -> None:
    """An archive that could not be read (nbank.json gone: unmounted) is one problem in
    status's audit line, not '0 PROBLEM(S)'."""
    (setup.archive.path / "nbank.json").rename(setup.archive.path / "away.json")
    report = Auditor(setup.registry, AuditCache(tmp_path / "cache.sqlite3")).run([setup.target])
    assert report.archives[0].error_code == "not-an-archive" and report.findings == 0
    line = render.audit_line({"last_audit": report.summary_json(), "next_audit": None})
    assert "1 PROBLEM(S)" in line


AS_USER = """
import json, sys
from pathlib import Path
from nbankd.audit import AuditSettings, AuditTarget, run_audit
from nbankd.registry.embedded import EmbeddedRegistry

state, arch = Path(sys.argv[1]), Path(sys.argv[2])
registry = EmbeddedRegistry(state / "registry.sqlite3")
settings = AuditSettings(max_mb_per_s=0, staging_grace=0)
report = run_audit([AuditTarget("arch", arch)], registry, state, full=True, settings=settings)
print(json.dumps(report.to_json()))
"""


def test_audit_as_a_user_who_cannot_read_a_file_or_a_stub_folder(
    unpriv_user: TestUser, user_tmp_path: Path
) -> None:
    """Run as an unprivileged user: a file it cannot read is 'unreadable' (once), a stub
    folder it cannot list is one 'unreadable' finding saying what to do; the resources in
    that folder are neither reported missing nor dropped from the cache, and the rest of
    the archive is still audited."""
    s = make_setup(user_tmp_path, n=3, group=unpriv_user.group, shared=True)
    for name in ("ab001", "ab002"):
        add(s, name, name.encode() * 50)
    s.registry.close()
    for folder, dirs, files in os.walk(user_tmp_path):
        for entry in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(entry, unpriv_user.uid, unpriv_user.gid)

    def audit() -> dict[str, object]:
        proc = unpriv_user.python(AS_USER, s.state, s.archive.path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]

    assert audit()["ok"] is True
    secret = s.archive.stored_path("res001")
    stub = s.archive.resources_dir / "ab"
    assert secret is not None
    for path, mode in ((secret, 0o400), (stub, 0o700)):
        os.chown(path, 0, unpriv_user.gid)
        path.chmod(mode)
    report = audit()
    [result] = report["archives"]  # type: ignore[index]
    found = Counter((f["kind"], f["resource"], f["path"]) for f in result["findings"])
    assert found == Counter(
        {
            (UNREADABLE, "res001", str(secret)): 1,
            (PERMISSION, "res001", str(secret)): 1,
            (UNREADABLE, None, str(stub)): 1,
            (PERMISSION, None, str(stub)): 1,
        }
    )
    details = {f["path"]: f["detail"] for f in result["findings"] if f["kind"] == UNREADABLE}
    assert "Permission denied while reading it" in details[str(secret)]
    assert "unable to list: Permission denied; check its owner and mode" in details[str(stub)]
    assert result["hashed"] == 2  # res000 and res002; res001 could not be read
    with sqlite3.connect(s.state / "audits" / "cache.sqlite3") as db:
        names = {n for (n,) in db.execute("SELECT name FROM entries")}
    assert {"ab001", "ab002"} <= names  # not forgotten: their folder was not listed


def test_resource_another_host_is_still_placing_is_not_yet_missing(
    setup: Setup, tmp_path: Path
) -> None:
    """A resource registered moments ago by someone else whose file is not there (another
    host registers, then copies) is not reported; past the grace, still absent, it is."""
    setup.registry.add_resource(dtype="dat", archive="arch", name="late01", sha1=sha1(b"late"))
    settings = AuditSettings(staging_grace=GRACE)
    now = Auditor(setup.registry, AuditCache(tmp_path / "c1.sqlite3"), settings=settings)
    assert kinds(now.run([setup.target])) == Counter()
    later = Auditor(
        setup.registry,
        AuditCache(tmp_path / "c2.sqlite3"),
        settings=settings,
        clock=lambda: time.time() + 2 * GRACE,
    )
    assert kinds(later.run([setup.target])) == Counter({(MISSING_FROM_ARCHIVE, "late01", None): 1})


def test_resource_this_daemon_deposited_is_missing_at_once(setup: Setup, tmp_path: Path) -> None:
    """A resource the daemon's own journal shows deposited, registered moments ago and
    gone from the archive, is reported by the next audit: no grace for what we placed."""
    setup.registry.add_resource(dtype="dat", archive="arch", name="mine01", sha1=sha1(b"mine"))
    audit = Auditor(
        setup.registry,
        AuditCache(tmp_path / "cache.sqlite3"),
        settings=AuditSettings(staging_grace=GRACE),
        ours=lambda names: {n for n in names if n == "mine01"},
    )
    assert kinds(audit.run([setup.target])) == Counter({(MISSING_FROM_ARCHIVE, "mine01", None): 1})


def test_registry_failing_during_the_walk_stops_the_walk_and_the_reads(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing fails (nothing listens) while the walk is held: the walk stops there,
    nothing is read, and the archive's error is the registry's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    down = HttpRegistry(f"http://127.0.0.1:{port}/neurobank/")
    cache = AuditCache(tmp_path / "cache.sqlite3")
    audit = Auditor(down, cache, settings=AuditSettings(max_mb_per_s=0))
    go = tmp_path / "go"
    monkeypatch.setenv("NBANKD_AUDIT_PAUSE_AT", "walk-top")
    monkeypatch.setenv("NBANKD_AUDIT_PAUSE_UNTIL", str(go))
    out: dict[str, AuditReport] = {}
    thread = threading.Thread(target=lambda: out.update(report=audit.run([setup.target])))
    thread.start()
    wait_for(Path(f"{go}.reached").exists, what="the walk to be held")
    wait_for(lambda: audit._halt.abort.is_set(), what="the listing to fail")
    go.touch()
    thread.join(60)
    [result] = out["report"].archives
    assert result.error_code == "registry-unavailable" and result.stored == 0
    assert cache.load("arch") == {}  # no file was read
