"""Disk faults during group-commit rounds, reviewed hostilely: the state directory
(journal, embedded registry, receipts) or the archive filling while a burst of small
files moves through its steps together (:mod:`nbankd.deposit.rounds`).

Everything is real: the daemon is the real ``nbankd`` process run in a private mount
namespace (:mod:`fixtures.mountns`), the full filesystems are real tmpfs mounts filled
to their last block, the inputs are real files. Each test names the behaviour expected;
the ones marked *guard* pass today and keep a behaviour that held up.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for, work_entries
from fixtures.mountns import MountNamespace, fill_to_the_last_block
from nbankd.deposit.receipts import read_receipts

PAGE = 4096  # tmpfs allocates a file's bytes a page at a time


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def ctl_json(h: DaemonHarness, *args: str) -> tuple[int, Any]:
    """``nbankctl --json ARGS`` against the daemon: (exit status, document)."""
    out = nbankctl(h, "--json", *args, timeout=60)
    assert out.returncode in (0, 1), f"nbankctl {args}: {out.returncode} {out.stderr}"
    return out.returncode, json.loads(out.stdout)


def journal_states(h: DaemonHarness) -> dict[str, tuple[str, str | None]]:
    """relpath -> (state, error code) of the newest journal row of every input."""
    return {r["relpath"]: (r["state"], r["code"]) for r in h.journal_rows()}


def receipt_lines(log: Path) -> list[bytes]:
    return log.read_bytes().split(b"\n") if log.exists() else []


# -- 1. a receipt cut by ENOSPC one byte before its newline ----------------------------


def _plan_name(cal_line: bytes, cal_stem: str, cal_size: int, want: int) -> tuple[str, int] | None:
    """A stem and an input size whose receipt line is ``want`` bytes long, the line of
    the calibration input (``cal_stem``, ``cal_size`` bytes) being ``cal_line``: the
    stem occurs ``k`` times in a line (source, id, url, archive_path), the size once."""
    k = cal_line.count(cal_stem.encode())
    for digits in range(1, 7):
        rest = want - len(cal_line) - (digits - len(str(cal_size)))
        if rest % k == 0:
            n = len(cal_stem) + rest // k
            if 3 <= n <= 200:
                return "q" * (n - 1) + "z", 10 ** (digits - 1) + 7
    return None


def test_a_receipt_cut_just_before_its_newline_by_a_full_state_disk_is_written_once(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """A receipt that a full state disk cut one byte short (all of its JSON, not its
    newline) is not written a second time when space returns: one receipt per deposit."""
    h: DaemonHarness = daemon_factory(wrap_argv=mount_ns.enter, inbox_options={"watch": "poll"})
    receipts_dir = h.state_dir / "receipts"
    receipts_dir.mkdir(parents=True)
    mount_ns.mount_tmpfs(receipts_dir, "256k")  # the receipts log's filesystem: tiny
    h.write_config()
    h.start()
    view = mount_ns.view(receipts_dir)

    # calibrate: real deposits, until the log's last page has room for a whole line of
    # a name we can choose, less its newline
    plan: tuple[str, int] | None = None
    for n in range(12):
        stem = f"calib{n:02d}"
        h.drop(f"{stem}.dat", os.urandom(1000 + n))
        wait_for(
            lambda stem=stem: journal_states(h).get(f"{stem}.dat", ("",))[0] == "done",
            60,
            f"{stem}.dat to be deposited",
        )
        [log] = list(view.glob("*.jsonl"))
        lines = [ln for ln in receipt_lines(log) if ln]
        cal_line = lines[-1] + b"\n"
        assert json.loads(cal_line)["id"] == stem
        slack = -log.stat().st_size % PAGE
        plan = _plan_name(cal_line, stem, 1000 + n, slack + 1)
        if plan is not None:
            break
    assert plan is not None, "no name fits the log's last page"
    target_stem, size = plan
    name = f"{target_stem}.dat"
    data = os.urandom(size)

    fill_to_the_last_block(view / "filler")  # the receipts' filesystem is now full
    h.drop(name, data)

    def cut_short() -> bool:
        return journal_states(h).get(name, ("", None))[1] == "receipts-unwritable"

    wait_for(cut_short, 60, "the record step to fail on the full receipts filesystem")
    tail = log.read_bytes().rsplit(b"\n", 1)[1]
    if tail:  # the short write left all of the receipt's JSON, only its newline missing
        torn = json.loads(tail)
        assert torn["id"] == target_stem and torn["size"] == size

    (view / "filler").unlink()  # space returns
    wait_for(lambda: journal_states(h).get(name, ("",))[0] == "done", 90, f"{name} deposited")
    ids = [r["id"] for r in read_receipts(view)]
    assert ids.count(target_stem) == 1, f"{ids.count(target_stem)} receipts of one deposit"
    _code, doc = ctl_json(h, "history", "--id", target_stem)
    assert doc["matched"] == 1, f"history shows the deposit {doc['matched']} times"
    h.stop()


# -- 2. the state directory fills in the middle of a burst's round ---------------------


def registry_records(ns: MountNamespace, db: Path) -> dict[str, str]:
    """name -> sha1 of every record of the embedded registry at ``db`` (read inside the
    namespace: SQLite resolves /proc/PID/root, which leads out of the tmpfs)."""
    query = (
        "import json, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
        "print(json.dumps(dict(db.execute('SELECT name, sha1 FROM resource').fetchall())))"
    )
    out = subprocess.run(
        [*ns.enter, sys.executable, "-c", query, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def check_each_input_once(
    h: DaemonHarness, ns: MountNamespace, state: Path, payloads: dict[str, bytes]
) -> None:
    """Each input once in archive, registry and receipts; nothing rejected or left."""
    assert h.reasons() == [], f"inputs were rejected: {h.reasons()}"
    receipts = list(read_receipts(ns.view(state) / "receipts"))
    tokens = [r["token"] for r in receipts]
    assert len(tokens) == len(set(tokens)), "a receipt written twice"
    assert sorted(r["id"] for r in receipts) == sorted(Path(n).stem for n in payloads)
    stored = {p.name: p.read_bytes() for p in (h.archive / "resources").rglob("*") if p.is_file()}
    assert stored == payloads, "archive holds other files than the inputs"
    records = registry_records(ns, state / "registry.sqlite3")
    assert records == {Path(n).stem: sha1(d) for n, d in payloads.items()}
    assert work_entries(h.inbox / ".nbank") == [], "work folder not empty"
    left = [n for n in payloads if (h.inbox / n).exists()]
    assert left == [], f"inputs left in the inbox: {left}"


@pytest.mark.parametrize("point", ["after-lookup", "after-verify", "after-receipt-append"])
def test_guard_state_disk_full_mid_round_each_input_lands_once(
    daemon_factory: Any, mount_ns: MountNamespace, point: str
) -> None:
    """*Guard*: the state filesystem fills while a round of small files is held at
    ``point`` (before its registrations commit together; before its receipts; between
    its receipts and its journal commit): status names the state directory, and once
    space returns every input lands once (archive, registry, one receipt), no restart."""
    h: DaemonHarness = daemon_factory(wrap_argv=mount_ns.enter)
    mnt = h.root / "statemnt"
    mnt.mkdir()
    mount_ns.mount_tmpfs(mnt, "24m")
    state = mnt / "state"
    h.state_dir = state
    h.write_config()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": point, "NBANKD_PAUSE_UNTIL": str(release)})
    view = mount_ns.view(mnt)
    payloads = {f"b{n:03d}.dat": os.urandom(3000 + 97 * n) for n in range(30)}
    for name, data in payloads.items():
        h.drop(name, data)
    wait_for(lambda: Path(f"{release}.reached").exists(), 60, "a round to reach its receipts")
    fill_to_the_last_block(view / "filler")
    release.touch()

    def told() -> list[str]:
        code, doc = ctl_json(h, "status")
        return [d for d in doc["degraded"] if str(state) in d] if code == 1 else []

    lines = wait_for(told, 60, "status to name the state directory")
    assert h.proc is not None and h.proc.poll() is None, "the daemon died"
    (view / "filler").unlink()
    h.state_dir = mount_ns.view(state)

    def deposited() -> bool:
        _code, doc = ctl_json(h, "status")
        return doc["inboxes"][0]["deposited"] == len(payloads)

    wait_for(deposited, 120, "every input to be deposited")
    wait_for(lambda: ctl_json(h, "status")[0] == 0, 60, "status to be healthy again")
    h.stop()
    check_each_input_once(h, mount_ns, state, payloads)
    assert lines, "status never named the state directory"


# -- 3. the archive runs out of room mid-round, then a kill -9 during recovery --------


def test_guard_archive_out_of_inodes_mid_round_then_killed_in_recovery_lands_once(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """*Guard*: the archive's filesystem runs out of inodes in a round (some copies of
    the burst staged, the others not; links into the stub folder refused with ENOSPC),
    status names the archive; space returns and the daemon is killed (-9) at its third
    publish link of the recovery; after a restart every input lands once."""
    h: DaemonHarness = daemon_factory(wrap_argv=mount_ns.enter)
    mnt = h.root / "mnt"
    mnt.mkdir()
    mount_ns.mount_tmpfs(mnt, "64m")
    h.archive = mnt / h.archive_name
    h.write_config()
    h.start()
    view = mount_ns.view(mnt)
    vfs = os.statvfs(view)
    used = vfs.f_files - vfs.f_ffree
    mount_ns.run("mount", "-o", f"remount,nr_inodes={used + 9}", mnt)
    payloads = {f"i{n:03d}.dat": os.urandom(2000 + 31 * n) for n in range(24)}
    for name, data in payloads.items():
        h.drop(name, data)

    def full_told() -> list[str]:
        code, doc = ctl_json(h, "status")
        full = [d for d in doc["degraded"] if "No space left" in d and h.archive_name in d]
        return full if code == 1 else []

    wait_for(full_told, 60, "status to say the archive is full")
    archive = mount_ns.view(h.archive)
    staged = [p.name for p in (archive / "staging").iterdir()]
    assert 0 < len(staged) < len(payloads), staged  # the burst is half staged
    h.kill9()
    mount_ns.run("mount", "-o", "remount,nr_inodes=100000", mnt)
    try:  # the recovery may reach its third publish link before the start says READY
        h.start(env={"NBANKD_CRASH_AT": "after-publish-link:3"})
    except AssertionError:
        assert h.proc is not None and h.proc.poll() == -9, "the start failed otherwise"
    assert h.wait_exit(timeout=60) == -9, "the recovery never reached its third publish link"
    h.start()

    def all_done() -> bool:
        _code, doc = ctl_json(h, "status")
        return doc["inboxes"][0]["deposited"] == len(payloads)

    wait_for(all_done, 120, "every input to be deposited")
    h.stop()
    h.archive = archive
    assert h.reasons() == [], h.reasons()
    receipts = h.receipts()
    assert sorted(r["id"] for r in receipts) == sorted(Path(n).stem for n in payloads)
    stored = {p.name: p.read_bytes() for p in (archive / "resources").rglob("*") if p.is_file()}
    assert stored == payloads
    with h.open_registry() as reg:
        records = {r.name: r.sha1 for r in reg.search(archive=h.archive_name)}
    assert records == {Path(n).stem: sha1(d) for n, d in payloads.items()}
    assert list((archive / "staging").iterdir()) == [], "staging/ not empty"
    assert work_entries(h.inbox / ".nbank") == []
