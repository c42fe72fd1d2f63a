"""Disk faults: a full archive filesystem, an archive that disappears, a permission error.

The archive lives on a small tmpfs mounted in a private mount namespace that a
holder process (``unshare -m``) keeps alive for the test; the daemon runs inside
it (``nsenter``) and the test reaches the archive through ``/proc/PID/root``. When
the holder and the daemon end, the mounts go with them: a failed test leaves
nothing mounted. Each test breaks the archive while real inputs are on their way,
checks that the inputs stay intact in their inbox, that nothing partial shows in
``resources/`` and that status reports the problem, then repairs the archive and
checks that the work resumes by itself and every input lands exactly once.

Figures go to ``tests/reliability/results/disk_faults.json`` for RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, wait_for, work_entries
from fixtures.mountns import MountNamespace, fill_to_the_last_block
from nbankd.hashing import sha1_file

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
RESULTS = Path(__file__).parent / "results" / "disk_faults.json"
MiB = 1 << 20

_figures: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _write_figures() -> Iterator[None]:
    """Writes the figures of the tests that ran, for RELIABILITY.md to quote."""
    yield
    if not _figures:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "suite": "disk faults (tmpfs archive in a private mount namespace)",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "faults_injected": {f["case"]: f["faults_seen"] for f in _figures},
                "inputs": sum(f["inputs"] for f in _figures),
                "losses": sum(f["losses"] for f in _figures),
                "rejected": sum(f["rejected"] for f in _figures),
                "cases": _figures,
            },
            indent=2,
        )
        + "\n"
    )


def tmpfs_archive(daemon_factory: Any, ns: MountNamespace, size: str) -> tuple[DaemonHarness, Path]:
    """A daemon (embedded registry) whose archive is on a fresh tmpfs; (harness, mountpoint)."""
    h: DaemonHarness = daemon_factory(wrap_argv=ns.enter)
    mnt = h.root / "mnt"
    mnt.mkdir()
    ns.mount_tmpfs(mnt, size)
    h.archive = mnt / h.archive_name
    h.write_config()
    return h, mnt


# --- helpers ---------------------------------------------------------------------------


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def ctl(h: DaemonHarness, *args: str) -> tuple[int, Any]:
    """``nbankctl --json ARGS`` against the harness's daemon: (exit status, document)."""
    out = subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (0, 1), f"nbankctl {args} failed: {out.returncode} {out.stderr}"
    return out.returncode, json.loads(out.stdout)


def drop_batch(h: DaemonHarness, sizes: dict[str, int]) -> dict[str, bytes]:
    payloads = {name: os.urandom(size) for name, size in sizes.items()}
    for name, data in payloads.items():
        h.drop(name, data)
    return payloads


def inputs_intact(h: DaemonHarness, payloads: dict[str, bytes]) -> None:
    """Each input's bytes are in its inbox, as dropped or claimed into ``.nbank/``."""
    present: set[str] = set()
    for folder in (h.inbox, h.inbox / ".nbank"):
        for p in folder.iterdir() if folder.is_dir() else ():
            if p.is_file():
                present.add(sha1_file(p))
    missing = [name for name, data in payloads.items() if sha1(data) not in present]
    assert missing == [], f"inputs not intact in their inbox: {missing}"


def nothing_partial(resources: Path, payloads: dict[str, bytes]) -> None:
    """Every file in ``resources/`` is a complete input, byte for byte."""
    complete = {sha1(d) for d in payloads.values()}
    for p in resources.rglob("*"):
        if p.is_file():
            assert sha1_file(p) in complete, f"{p} in resources/ is not a complete input"


def waiting_errors(h: DaemonHarness) -> list[dict[str, Any]]:
    """Items of the daemon's queue that are waiting after an error."""
    _code, doc = ctl(h, "queue")
    return [i for i in doc["items"] if i["error_code"]]


def check_exactly_once(
    h: DaemonHarness, archive: Path, payloads: dict[str, bytes]
) -> dict[str, int]:
    """Every input once in archive, registry and receipts; nothing left over anywhere."""
    assert h.reasons() == [], f"inputs were rejected: {h.reasons()}"
    receipts = h.receipts()
    ids = sorted(r["id"] for r in receipts)
    assert ids == sorted(Path(n).stem for n in payloads), "a receipt missing or written twice"
    stored = {p.name: p for p in (archive / "resources").rglob("*") if p.is_file()}
    assert sorted(stored) == sorted(payloads), "archive holds other files than the inputs"
    with h.open_registry() as reg:
        records = {r.name: r for r in reg.search(archive=h.archive_name)}
        assert sorted(records) == ids, "registry records differ from the inputs"
        for name, data in payloads.items():
            assert stored[name].read_bytes() == data, f"{name}: archived bytes differ"
            assert records[Path(name).stem].sha1 == sha1(data)
            assert len(list(reg.search(sha1=sha1(data)))) == 1, f"{name}: registered twice"
            assert not (h.inbox / name).exists(), f"{name}: source still in the inbox"
    assert work_entries(h.inbox / ".nbank") == [], "work folder not empty"
    assert list((archive / "staging").iterdir()) == [], "staging/ not empty"
    return {"inputs": len(payloads), "losses": 0, "rejected": 0}


def log_count(h: DaemonHarness, needle: str) -> int:
    """Failed steps the daemon logged whose error contains ``needle``."""
    n = 0
    for line in h.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "step failed; will retry" and needle in entry.get("error", ""):
                n += 1
    return n


# --- the faults ------------------------------------------------------------------------


def test_full_archive_filesystem_waits_then_resumes(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """ENOSPC mid-copy: inputs stay, staging is cleaned, status says so; freeing space resumes."""
    h, mountpoint = tmpfs_archive(daemon_factory, mount_ns, "8m")
    h.start()
    mnt = mount_ns.view(mountpoint)
    archive = mount_ns.view(h.archive)
    assert (archive / "nbank.json").is_file()
    # leave about 1 MiB free, with a filler file outside the archive folder
    vfs = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * (vfs.f_bavail * vfs.f_frsize - MiB))
    sizes = {"big1.dat": 3 * MiB, "big2.dat": 2 * MiB + 12345, "small.dat": 20_000}
    payloads = drop_batch(h, sizes)
    big = {k: v for k, v in payloads.items() if k.startswith("big")}

    def full_reported() -> bool:
        errs = waiting_errors(h)
        full = {i["relpath"] for i in errs if "No space left" in (i["error"] or "")}
        return set(big) <= full

    wait_for(full_reported, 60, "the queue to report ENOSPC for both large inputs")
    code, doc = ctl(h, "status")
    assert code == 1, doc["degraded"]
    full = [d for d in doc["degraded"] if "No space left" in d]
    assert full and all(h.archive_name in d for d in full), doc["degraded"]
    last = doc["last_error"]
    assert last["code"] == "archive-unavailable" and "No space left" in last["error"], last
    # while full: no large input deposited or lost, nothing partial anywhere
    assert not any(r["id"].startswith("big") for r in h.receipts())
    assert h.reasons() == []
    inputs_intact(h, big)
    nothing_partial(archive / "resources", payloads)
    wait_for(
        lambda: not any((archive / "staging").iterdir()),
        30,
        "staging/ to be clean between attempts",
    )
    seen = log_count(h, "No space left")
    filler.unlink()
    h.wait_settled(len(payloads), timeout=90)
    wait_for(lambda: ctl(h, "status")[0] == 0, 30, "status to be healthy again")
    h.stop()
    counts = check_exactly_once(h, archive, payloads)
    _figures.append({"case": "ENOSPC", "faults_seen": seen, "status_exit": code, **counts})


def test_archive_that_disappears_waits_then_resumes(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """nbank.json gone (filesystem unmounted): claimed and new inputs wait, then land once."""
    h, mountpoint = tmpfs_archive(daemon_factory, mount_ns, "64m")
    release = h.root / "release"
    # an input claimed before the archive vanishes is held right after claiming; the
    # lane claims a round's inputs one after another, so the first holds the others
    # back, and they find the archive gone when released
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(release)})
    archive = mount_ns.view(h.archive)
    first = drop_batch(h, {"early1.dat": 3 * MiB, "early2.dat": 1000, "early3.dat": 54321})
    wait_for(lambda: work_entries(h.inbox / ".nbank"), 30, "the first input to be claimed")
    held = len(work_entries(h.inbox / ".nbank"))
    # "unmount" the export: an empty filesystem now covers the archive's parent
    mount_ns.mount_tmpfs(mountpoint, "1m")
    assert not (archive / "nbank.json").exists()
    release.touch()
    later = drop_batch(h, {"late1.dat": 4096, "late2.dat": 2 * MiB})
    payloads = {**first, **later}

    def outage_shown() -> dict[str, Any] | None:
        code, doc = ctl(h, "status")
        [inbox] = doc["inboxes"]
        problem = inbox["archive_problem"] or ""
        return doc if code == 1 and "nbank.json does not exist" in problem else None

    doc = wait_for(outage_shown, 30, "status to report the missing archive")
    assert any("nbank.json" in d for d in doc["degraded"]), doc["degraded"]

    def all_wait() -> bool:
        waiting = waiting_errors(h)
        claimed = [i for i in waiting if i["state"] == "claimed"]
        return {i["relpath"] for i in waiting} == set(first) and len(claimed) == held

    wait_for(all_wait, 30, "the claimed and the unclaimed inputs to wait for the archive")
    assert h.receipts() == [] and h.reasons() == [], "an input moved while the archive was gone"
    inputs_intact(h, payloads)
    seen = sum(i["attempts"] for i in waiting_errors(h))
    mount_ns.run("umount", mountpoint)  # the export is back
    assert (archive / "nbank.json").is_file()
    h.wait_settled(len(payloads), timeout=90)
    wait_for(lambda: ctl(h, "status")[0] == 0, 30, "status to be healthy again")
    h.stop()
    counts = check_exactly_once(h, archive, payloads)
    _figures.append({"case": "archive unmounted", "faults_seen": seen, **counts})


def test_archive_permission_denied_waits_then_resumes(
    daemon_factory: Any, unpriv_user: Any
) -> None:
    """EACCES on resources/ (daemon unprivileged): registered inputs wait, then publish once."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-register", "NBANKD_PAUSE_UNTIL": str(release)})
    resources = h.archive / "resources"
    mode = resources.stat().st_mode & 0o7777
    first = drop_batch(h, {"perm1.dat": 3 * MiB, "perm2.dat": 777})

    def registered() -> bool:
        _code, doc = ctl(h, "queue")
        items = doc["items"]
        return len(items) == len(first) and all(
            i["state"] == "checked" and i["status"] == "running" for i in items
        )

    wait_for(registered, 30, "the first inputs to be held right after registering")
    resources.chmod(0)  # the service user may no longer write (or enter) resources/
    release.touch()
    later = drop_batch(h, {"perm3.dat": 2 * MiB})
    payloads = {**first, **later}

    def denied() -> bool:
        errs = waiting_errors(h)
        return sum("Permission denied" in (i["error"] or "") for i in errs) >= len(first)

    wait_for(denied, 30, "publishing to fail with EACCES")

    def degraded() -> bool:  # the next scan of the inbox finds resources/ not writable
        code, doc = ctl(h, "status")
        [inbox] = doc["inboxes"]
        return code == 1 and "not writable" in (inbox["archive_problem"] or "")

    wait_for(degraded, 30, "status to report the archive not writable")
    assert h.receipts() == [] and h.reasons() == [], "an input moved while access was denied"
    inputs_intact(h, payloads)
    assert not any(p.is_file() for p in resources.rglob("*"))
    seen = log_count(h, "Permission denied")
    resources.chmod(mode)
    h.wait_settled(len(payloads), timeout=90)
    wait_for(lambda: ctl(h, "status")[0] == 0, 30, "status to be healthy again")
    h.stop()
    counts = check_exactly_once(h, h.archive, payloads)
    _figures.append({"case": "EACCES", "faults_seen": seen, **counts})


def test_full_state_directory_waits_then_drains(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """state_dir on a full tmpfs: the daemon stays up, status says the journal cannot be
    written, inputs stay in the inbox; once space returns every input lands once."""
    h: DaemonHarness = daemon_factory(wrap_argv=mount_ns.enter)
    mnt = h.root / "statemnt"
    mnt.mkdir()
    mount_ns.mount_tmpfs(mnt, "4m")
    h.state_dir = mnt / "state"
    h.write_config()
    h.start()
    view = mount_ns.view(mnt)
    h.state_dir = view / "state"  # from here on the test reads it through the namespace
    filler = view / "filler"
    fill_to_the_last_block(filler)
    payloads = drop_batch(h, {"st1.dat": 5000, "st2.dat": 7000, "st3.dat": 9000})

    def journal_reported() -> bool:
        code, doc = ctl(h, "status")
        return code == 1 and any("journal in" in d for d in doc["degraded"])

    wait_for(journal_reported, 60, "status to say the journal cannot be written")
    assert h.proc is not None and h.proc.poll() is None, "the daemon died"
    assert h.receipts() == [] and h.reasons() == []
    inputs_intact(h, payloads)
    filler.unlink()
    h.wait_settled(len(payloads), timeout=90)
    wait_for(lambda: ctl(h, "status")[0] == 0, 30, "status to be healthy again")
    h.stop()
    # once each in receipts, archive and registry (the registry is read inside the
    # namespace: SQLite resolves /proc/PID/root, which leads out of the tmpfs)
    assert h.reasons() == []
    assert sorted(r["id"] for r in h.receipts()) == sorted(Path(n).stem for n in payloads)
    stored = {p.name: p.read_bytes() for p in (h.archive / "resources").rglob("*") if p.is_file()}
    assert stored == payloads
    query = (
        "import json, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
        "print(json.dumps(dict(db.execute('SELECT name, sha1 FROM resource').fetchall())))"
    )
    out = subprocess.run(
        [*mount_ns.enter, sys.executable, "-c", query, str(mnt / "state" / "registry.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {Path(n).stem: sha1(d) for n, d in payloads.items()}
    assert work_entries(h.inbox / ".nbank") == []
    faults = sum("journal not writable" in ln for ln in h.log_path.read_text().splitlines())
    _figures.append(
        {
            "case": "state_dir full",
            "faults_seen": faults,
            "inputs": len(payloads),
            "losses": 0,
            "rejected": 0,
        }
    )
