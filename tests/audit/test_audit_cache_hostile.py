"""Hostile review of the audit's cache and schedule and of the read-only query commands:
what an incremental audit trusts (the cache's stat, the walk, the clock), and whether it
or ``nbankctl`` can say "fine" about a stored file that is gone or altered, or hang.

Each test names the behaviour expected; they fail on the code reviewed (see the report
of that review for the cause and a suggested fix of each)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from audit_helpers import Setup, make_setup

from fixtures.cli_backends import base_env, sha1, store
from fixtures.daemon import wait_for
from fixtures.sshfs import Sshfs
from nbankctl.checkarchive import check_archive
from nbankd.archive.opening import create_archive
from nbankd.audit.cache import AuditCache
from nbankd.audit.model import HASH_MISMATCH, MISSING_FROM_ARCHIVE, MISSING_FROM_REGISTRY
from nbankd.audit.plan import DAY
from nbankd.audit.reader import Cancelled
from nbankd.audit.run import Auditor
from nbankd.audit.schedule import AuditScheduler
from nbankd.audit.settings import AuditSettings, AuditTarget, InFlight
from nbankd.config.model import ArchiveConfig, AuditConfig, Config
from nbankd.registry.embedded import EmbeddedRegistry

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
YEAR = 365 * DAY


def kinds(report: Any) -> Counter[tuple[str, str | None]]:
    return Counter((f.kind, f.resource) for a in report.archives for f in a.findings)


def settings(**overrides: Any) -> AuditSettings:
    return AuditSettings(**{"scrub_days": 0, "max_mb_per_s": 0, "workers": 1, **overrides})


def rewrite_in_place(path: Path, offset: int = 0) -> None:
    """Flips one byte of ``path`` in place (same size) and puts its mtime back."""
    st = os.stat(path)
    mode = st.st_mode & 0o7777
    os.chmod(path, mode | 0o200)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- what the walk says is stored -------------------------------------------------------


def test_a_resource_whose_file_was_renamed_to_a_look_alike_is_missing_from_the_archive(
    setup: Setup, tmp_path: Path
) -> None:
    """A registered resource whose only file became ``res001.dat.bak`` is reported missing
    from the archive by the audit, as ``nbankctl check archive`` (and nbank) report it."""
    cache = AuditCache(tmp_path / "cache.sqlite3")
    assert Auditor(setup.registry, cache, settings=settings()).run([setup.target], full=True).ok
    stored = setup.archive.stored_path("res001")
    assert stored is not None
    stored.rename(stored.with_name(stored.name + ".bak"))
    checked = check_archive(setup.archive, setup.registry, "arch")
    assert (MISSING_FROM_ARCHIVE, "res001") in Counter(
        (f.kind, f.resource) for f in checked.findings
    )
    report = Auditor(setup.registry, cache, settings=settings()).run([setup.target])
    # the walk files res001.dat.bak as a resource "res001.dat"; the re-check on disk
    # before reporting res001 missing takes any name starting "res001." as res001's file
    assert (MISSING_FROM_ARCHIVE, "res001") in kinds(report), kinds(report)
    assert not report.ok


# --- the clock ------------------------------------------------------------------------


def test_resources_read_while_the_clock_was_a_year_ahead_are_scrubbed_within_scrub_days(
    setup: Setup, tmp_path: Path
) -> None:
    """After the clock is stepped back from a year ahead, the rolling scrub still reads
    every resource within scrub_days (3 daily runs here), not the same few over and over."""
    now = time.time()
    cache = AuditCache(tmp_path / "cache.sqlite3")
    scrub = settings(scrub_days=3, every=DAY)
    ahead = now + YEAR
    first = Auditor(setup.registry, cache, settings=scrub, clock=lambda: ahead)
    assert first.run([setup.target], full=True).ok
    for day in (1, 2, 3):
        moment = now + day * DAY
        assert (
            Auditor(setup.registry, cache, settings=scrub, clock=lambda m=moment: m)
            .run([setup.target])
            .ok
        )
    entries = cache.load("arch")
    not_read_since = sorted(n for n, e in entries.items() if e.verified_at >= ahead)
    assert not_read_since == [], f"never re-read after the clock step: {not_read_since}"


def scheduler(s: Setup, every: float = DAY, clock: Any = time.time) -> AuditScheduler:
    config = Config(
        source=s.state / "config.yaml",
        state_dir=s.state,
        archives=(ArchiveConfig(s.archive.path, "arch"),),
        audit=AuditConfig(every=every, max_mb_per_s=0),
    )
    return AuditScheduler(
        config=lambda: config, registry=lambda: s.registry, in_flight=InFlight, clock=clock
    )


def audit_now(sched: AuditScheduler, full: bool = True) -> dict[str, Any]:
    """Requests an audit and waits for its report."""
    ticket = sched.request(full)
    state = wait_for(
        lambda: (st := sched.wait(ticket, 1.0)) and st["state"] == "done" and st,
        what="the requested audit's report",
    )
    return state["report"]  # type: ignore[no-any-return]


def test_the_next_scheduled_audit_is_due_within_every_after_the_clock_is_stepped_back(
    setup: Setup,
) -> None:
    """An audit that ran while the clock was a year ahead does not put the next scheduled
    audit a year off once the daemon restarts with the right time: it is due within
    ``every`` (here 1 h)."""
    ahead = time.time() + YEAR
    wrong = scheduler(setup, every=3600.0, clock=lambda: ahead)
    wrong.start()
    try:
        assert audit_now(wrong)["ok"]
    finally:
        wrong.stop()
    restarted = scheduler(setup, every=3600.0)
    try:
        due = restarted.next_due()
        assert due is not None and due <= time.time() + 3600.0, (
            f"next scheduled audit {(due or 0) - time.time():.0f} s from now"
        )
    finally:
        restarted.stop()


def test_status_after_a_restart_shows_the_latest_audit_not_one_stamped_ahead(
    setup: Setup,
) -> None:
    """A clean report written while the clock was a year ahead does not hide, after a
    restart, the problems the latest audit (run at the right time) found."""
    ahead = time.time() + YEAR
    wrong = scheduler(setup, clock=lambda: ahead)
    wrong.start()
    try:
        assert audit_now(wrong)["ok"]
    finally:
        wrong.stop()
    victim = setup.archive.stored_path("res005")
    assert victim is not None
    rewrite_in_place(victim)
    right = scheduler(setup)
    right.start()
    try:
        assert not audit_now(right)["ok"]
        assert right.problems() != []
    finally:
        right.stop()
    restarted = scheduler(setup)
    try:
        assert restarted.problems() != [], "status is healthy: it shows the clean report"
    finally:
        restarted.stop()


# --- filesystems whose ctime is not a change time ----------------------------------------


def test_an_in_place_edit_with_its_mtime_put_back_is_found_on_sshfs(
    sshfs: Sshfs, tmp_path: Path
) -> None:
    """On SSHFS (ctime reported as the mtime, inodes numbered by path), a stored file
    rewritten in place on the server, same size, mtime put back, is a hash mismatch
    for the next incremental audit, not "clean" until the scrub comes round."""
    mount = sshfs.mount("archive-fs")
    registry = EmbeddedRegistry(tmp_path / "state" / "registry.sqlite3")
    try:
        registry.add_datatype("dat", "application/octet-stream")
        archive = create_archive(mount.mountpoint / "arch", registry.url)
        registry.add_archive("arch", "neurobank", str(archive.path))
        data = os.urandom(64 * 1024)
        registry.add_resource(dtype="dat", archive="arch", name="net001", sha1=sha1(data))
        stored = store(archive, "net001", data)
        target = AuditTarget("arch", archive.path)
        cache = AuditCache(tmp_path / "cache.sqlite3")
        assert Auditor(registry, cache, settings=settings()).run([target], full=True).ok
        rewrite_in_place(mount.remote / stored.relative_to(mount.mountpoint), offset=4096)
        assert stored.read_bytes() != data  # the mount shows the new bytes
        report = Auditor(registry, cache, settings=settings()).run([target])
        assert kinds(report) == Counter({(HASH_MISMATCH, "net001"): 1}), kinds(report)
    finally:
        registry.close()


# --- bounded time ------------------------------------------------------------------------


def test_an_audit_is_not_held_up_by_a_huge_sparse_stray_file(tmp_path: Path) -> None:
    """A 1 TiB sparse file registered nowhere, dropped into a stub folder, is reported
    missing from the registry within seconds: nothing needs its hash, so the audit does
    not spend the hours reading its zeros (nor does every later audit, as it never
    finishes, and reports nothing else meanwhile)."""
    s = make_setup(tmp_path, n=3)
    stray = store(s.archive, "zz_huge", b"")  # the archive's modes: no other finding
    os.truncate(stray, 1 << 40)
    old = time.time() - 2 * 3600
    os.utime(stray, (old, old))
    audit = Auditor(
        s.registry, AuditCache(tmp_path / "cache.sqlite3"), settings=settings(staging_grace=0.0)
    )
    out: dict[str, Any] = {}

    def run() -> None:
        with contextlib.suppress(Cancelled):  # stopped below, if it is still reading
            out["report"] = audit.run([s.target])

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    thread.join(60)  # a loaded machine's audit of 3 small files; the zeros take hours
    took = time.monotonic() - started
    if thread.is_alive():
        audit.stop.set()  # the read stops at its next block
        thread.join(30)
    try:
        assert "report" in out, f"the audit was still reading after {took:.0f} s"
        assert kinds(out["report"]) == Counter({(MISSING_FROM_REGISTRY, "zz_huge"): 1})
    finally:
        s.registry.close()


def test_verify_of_a_fifo_says_so_instead_of_waiting_forever(setup: Setup, tmp_path: Path) -> None:
    """``nbankctl verify`` given a FIFO (planted among stored files, say, and reached by a
    glob) answers at once that it is not a regular file or folder, exit 1."""
    fifo = tmp_path / "res999.dat"
    os.mkfifo(fifo)
    plain = setup.archive.stored_path("res000")
    assert plain is not None
    config = tmp_path / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {setup.state}\n")
    env = {**base_env(tmp_path / "home"), "NBANKD_CONFIG": str(config)}
    try:
        proc = subprocess.run(
            [NBANKCTL, "verify", str(plain), str(fifo)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,  # a start on a loaded machine; the fault waits for ever
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("nbankctl verify was still waiting on the FIFO after 60 s") from None
    assert proc.returncode == 1, proc.stderr
    assert f"{plain}: OK" in proc.stdout


# --- links in place of stored files and folders -------------------------------------------


def test_resources_folder_swapped_for_a_link_is_named_a_link_not_a_mode_problem(
    setup: Setup, tmp_path: Path
) -> None:
    """``resources/`` replaced by a link to a copy elsewhere is reported as a symbolic link
    (where the archive's files really are), not as ``permission (mode 0777)``, which
    ``check archive --fix`` then silently leaves as it is."""
    resources = setup.archive.resources_dir
    elsewhere = tmp_path / "elsewhere"
    resources.rename(elsewhere)
    resources.symlink_to(elsewhere)
    report = Auditor(setup.registry, AuditCache(tmp_path / "c.sqlite3"), settings=settings()).run(
        [setup.target], full=True
    )
    [result] = report.archives
    about = [f for f in result.findings if f.path == resources]
    assert about and all("link" in f.detail for f in about), [str(f) for f in about]


def test_guard_a_stored_file_or_stub_folder_swapped_for_a_link_to_a_good_copy_is_never_clean(
    setup: Setup, tmp_path: Path
) -> None:
    """Guard (passes): a stored file, then its whole stub folder, replaced by a link to an
    intact copy elsewhere: neither the incremental audit nor check archive says clean."""
    cache = AuditCache(tmp_path / "cache.sqlite3")
    assert Auditor(setup.registry, cache, settings=settings()).run([setup.target], full=True).ok
    stored = setup.archive.stored_path("res003")
    assert stored is not None
    copy = tmp_path / "copy.dat"
    copy.write_bytes(stored.read_bytes())
    stored.unlink()
    stored.symlink_to(copy)
    assert not Auditor(setup.registry, cache, settings=settings()).run([setup.target]).ok
    assert not check_archive(setup.archive, setup.registry, "arch").ok
    stored.unlink()
    stub = stored.parent
    stub.rename(tmp_path / "stub-copy")
    (tmp_path / "stub-copy" / stored.name).write_bytes(copy.read_bytes())
    stub.symlink_to(tmp_path / "stub-copy")
    assert not Auditor(setup.registry, cache, settings=settings()).run([setup.target]).ok
    assert not check_archive(setup.archive, setup.registry, "arch").ok


def test_guard_a_fifo_in_the_archive_never_holds_an_audit(setup: Setup, tmp_path: Path) -> None:
    """Guard (passes): a FIFO in place of a stored file is reported, never opened for a
    blocking read: the audit and check archive finish."""
    stored = setup.archive.stored_path("res004")
    assert stored is not None
    stored.unlink()
    os.mkfifo(stored)
    report = Auditor(setup.registry, AuditCache(tmp_path / "c.sqlite3"), settings=settings()).run(
        [setup.target], full=True
    )
    assert not report.ok and any(f.path == stored for f in report.archives[0].findings)
    assert not check_archive(setup.archive, setup.registry, "arch").ok
