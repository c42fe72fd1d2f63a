"""Hostile inputs: every row of ``hostile_catalogue.ROWS`` ends in its one expected outcome.

Rows are made in a real inbox and the real ``nbankd`` (as root, or as an unprivileged
user for the permission rows) is left to deal with them. Rows that can share a daemon
do (one run per ``group``, made once per module and reused by every row's test); pause
seams (``NBANKD_PAUSE_AT``) change an input at an exact step, never after a sleep.

Besides each row's own assertions: every input is found exactly once (archive, rejected
folder or inbox) with its bytes, and nothing is written outside the archive, the inbox
and the state folder (a sentinel folder and ``/etc/passwd`` are compared before and
after, and every path under the run's root must belong to one of those places).
Figures go to ``results/hostile_inputs.json`` (:mod:`reliability.figures`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, wait_for, work_entries
from nbankd.archive.opening import create_archive
from nbankd.control.client import call
from reliability import figures
from reliability.hostile_catalogue import (
    ROWS,
    Ctx,
    Deposited,
    LeftInPlace,
    Made,
    Rejected,
    Row,
    fingerprint,
)

HARNESS_FILES = {"config.yaml", "control.sock", "notify.sock", "nbankd.log", "go", "go.reached"}
SETTLE = 0.3


def read_jsonl(folder: Path) -> list[dict[str, Any]]:
    """Receipts, read as the daemon writes them (names may hold undecodable bytes)."""
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def read_reasons(rejected: Path) -> dict[str, dict[str, Any]]:
    """Every ``.reason`` under the rejected folder, by the original path it names."""
    out: dict[str, dict[str, Any]] = {}
    if not rejected.is_dir():
        return out
    for path in rejected.rglob("*.reason"):
        try:
            reason = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
        except ValueError:
            continue  # a row's own input named *.reason, not JSON
        if isinstance(reason, dict) and "original_path" in reason:
            out[reason["original_path"]] = {**reason, "_file": str(path)}
    return out


# --- one daemon run for a group of rows ------------------------------------------------------


@dataclass
class Run:
    """What one group's daemon run left behind, read after the daemon stopped."""

    h: DaemonHarness
    ctx: Ctx
    made: dict[str, Made] = field(default_factory=dict)
    expected: dict[str, tuple[object, ...]] = field(default_factory=dict)  # fingerprints
    identity: dict[str, tuple[int, int]] = field(default_factory=dict)  # (inode, mtime_ns)
    explains: dict[str, dict[str, Any]] = field(default_factory=dict)
    receipts: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, dict[str, Any]] = field(default_factory=dict)
    outside_before: Any = None
    passwd_before: tuple[str, int] = ("", 0)
    log: str = ""


def _tree_state(top: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``top`` with its content and mtime (ctime moves with link counts)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            fp = fingerprint(path) if not stat.S_ISDIR(st.st_mode) else ("dir",)
            out[os.path.relpath(path, top)] = (*fp, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def _passwd() -> tuple[str, int]:
    data = Path("/etc/passwd").read_bytes()
    return hashlib.sha1(data).hexdigest(), os.stat("/etc/passwd").st_mtime_ns


def _make_outside(root: Path) -> Path:
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.wav").write_bytes(b"bytes that must never be archived " + os.urandom(64))
    (outside / "dir" / "inner.wav").write_bytes(b"inside an outside folder")
    (outside / "linked-origin.wav").write_bytes(b"a file with a second name " + os.urandom(64))
    (outside / "side-origin.yaml").write_bytes(b"id: from_a_hard_link\n")
    return outside


def _done(run: Run, row: Row) -> bool:
    """True once the row's outcome is complete on disk (or, left in place, explained)."""
    made = run.made[row.key]
    if isinstance(row.expect, LeftInPlace):
        reply = call(run.h.socket_path, "explain", {"path": str(made.path)})
        run.explains[row.key] = reply
        return bool(reply["state"] == row.expect.explain)
    if os.path.lexists(made.path):
        return False
    if isinstance(row.expect, Deposited):
        return any(r["id"] == row.expect.id for r in read_jsonl(run.h.state_dir / "receipts"))
    reason = read_reasons(run.h.rejected).get(str(made.path))
    return reason is not None and os.path.lexists(reason["rejected_path"])


def _wait_rows(run: Run, rows: list[Row], timeout: float = 60.0) -> None:
    pending = list(rows)

    def all_done() -> bool:
        pending[:] = [r for r in pending if not _done(run, r)]
        return not pending

    try:
        wait_for(all_done, timeout, "rows to reach their outcome")
    except AssertionError:
        run.h.dump_log()
        states = {r.key: run.explains.get(r.key, {}).get("message") for r in pending}
        raise AssertionError(f"rows not finished: {states}") from None


def _record(run: Run, row: Row, made: Made) -> None:
    run.made[row.key] = made
    run.expected[row.key] = fingerprint(made.path)
    st = os.lstat(made.path)
    run.identity[row.key] = (st.st_ino, st.st_mtime_ns)


def _finish(run: Run) -> Run:
    h = run.h
    if h.proc is not None and h.proc.poll() is None:
        assert h.stop() == 0
    for sock in run.ctx.sockets:
        sock.close()
    run.receipts = read_jsonl(h.state_dir / "receipts")
    run.reasons = read_reasons(h.rejected)
    run.log = h.log_path.read_text(errors="replace")
    return run


def _harness(root: Path, group: str, user: Any = None) -> Run:
    options: dict[str, Any] = {"settle_seconds": SETTLE}
    if group == "marker":
        options["ready"] = "marker"
    if group == "dirs":
        options["directories"] = "resources"
    if group == "grow":
        options["settle_seconds"] = 2
    if group == "grow-slow":
        options["settle_seconds"] = 5
    h = DaemonHarness(root=root, inbox_options=options, user=user)
    h.write_config()
    if group == "dirs":
        create_archive(h.archive, h.registry_address, allow_directories=True)
    scratch = root / "scratch"
    scratch.mkdir()
    h.inbox.mkdir()
    if user is not None:
        for path in (root, h.inbox):
            os.chown(path, user.uid, user.gid)
    ctx = Ctx(inbox=h.inbox, outside=_make_outside(root), scratch=scratch)
    return Run(h=h, ctx=ctx, outside_before=_tree_state(ctx.outside), passwd_before=_passwd())


def run_batch(root: Path, group: str, rows: list[Row], user: Any = None, other: Any = None) -> Run:
    """Makes every row (phase 1 first, deposited before phase 2 is made), waits, stops."""
    run = _harness(root, group, user)
    if other is not None:
        run.ctx.other = (other.uid, other.gid)
    first = [r for r in rows if r.phase == 1]
    later = [r for r in rows if r.phase != 1]
    if not first:  # everything is there before the daemon's first scan
        first, later = later, []
    for row in first:
        _record(run, row, row.make(run.ctx))
    run.h.start()
    _wait_rows(run, first)
    for row in later:
        _record(run, row, row.make(run.ctx))
    _wait_rows(run, later)
    # a receipt is written before the input leaves the work folder: wait for that too,
    # or a deposited input is counted twice (archive and work folder); what a row
    # planted there itself stays
    work = run.h.inbox / ".nbank"

    def claimed() -> list[Path]:
        return [p for p in work_entries(work) if re.fullmatch(r"[0-9a-f]{32}.*", p.name)]

    try:
        wait_for(lambda: not claimed(), 60, "the work folder to hold no claimed input")
    except AssertionError:
        raise AssertionError(f"left in the work folder: {claimed()}") from None
    _full_scan(run)
    return _finish(run)


def _full_scan(run: Run) -> None:
    """Asks for a rescan and waits until one has run: what it leaves alone stays alone."""
    asked = time.time()
    call(run.h.socket_path, "rescan")

    def scanned() -> bool:
        status = call(run.h.socket_path, "status")
        return all((i["last_scan"] or 0) > asked for i in status["inboxes"])

    wait_for(scanned, 30, "a full rescan")


def run_paused(
    root: Path, group: str, row: Row, point: str, act: Callable[[Run, Path], None]
) -> Run:
    """One row; the daemon holds at ``point`` while ``act`` changes the claimed input."""
    run = _harness(root, group)
    go = root / "go"
    run.h.start(env={"NBANKD_PAUSE_AT": point, "NBANKD_PAUSE_UNTIL": str(go)})
    made = row.make(run.ctx)
    run.made[row.key] = made
    work = run.h.inbox / ".nbank"
    claimed = wait_for(
        lambda: [p for p in work_entries(work) if not p.name.endswith((".yaml", ".json"))],
        30,
        "the input to be claimed",
    )[0]
    act(run, claimed)
    go.touch()
    _wait_rows(run, [row])
    return _finish(run)


def _swap_in_symlink(run: Run, claimed: Path) -> None:
    os.rename(claimed, run.ctx.scratch / "moved-aside")
    os.symlink(run.ctx.outside / "secret.wav", claimed)
    run.expected["symlink-swapped-in"] = fingerprint(claimed)


def _truncate(run: Run, claimed: Path) -> None:
    with open(claimed, "r+b") as f:
        f.truncate(1000)
    run.expected["truncated-mid-copy"] = fingerprint(claimed)


def run_growing(root: Path, group: str, row: Row, every: float, seconds: float) -> Run:
    """A writer appends to the file every ``every`` s for ``seconds`` while the daemon runs."""
    run = _harness(root, group)
    run.h.start()
    made = row.make(run.ctx)
    run.made[row.key] = made
    stop = threading.Event()
    end = time.monotonic() + seconds
    with open(made.path, "ab") as f:
        while time.monotonic() < end:
            stop.wait(every)  # the writer's pace, not synchronisation
            f.write(os.urandom(500))
            f.flush()
    run.expected[row.key] = fingerprint(made.path)
    _wait_rows(run, [row], timeout=60 + 4 * seconds)
    return _finish(run)


class Runs:
    """Each group's run, made on first use and shared by the module's tests."""

    def __init__(self, factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> None:
        self.factory = factory
        self.request = request
        self.runs: dict[str, Run] = {}
        self.failed: dict[str, BaseException] = {}
        self.user_roots: list[Path] = []

    def get(self, group: str) -> Run:
        if group in self.failed:  # one failed run fails its rows once, not once per row
            raise AssertionError(f"the {group!r} run failed: {self.failed[group]}")
        if group not in self.runs:
            try:
                self.runs[group] = self._run(group)
            except BaseException as err:
                self.failed[group] = err
                raise
        return self.runs[group]

    def _root(self, group: str) -> Path:
        return self.factory.mktemp(group)

    def _run(self, group: str) -> Run:
        rows = [r for r in ROWS if r.group == group]
        if group == "unpriv":
            user = self.request.getfixturevalue("unpriv_user")
            other = self.request.getfixturevalue("other_user")
            root = Path(tempfile.mkdtemp(prefix="nbankd-hostile-", dir="/tmp"))
            root.chmod(0o755)
            self.user_roots.append(root)
            return run_batch(root, group, rows, user=user, other=other)
        if group == "swap":
            return run_paused(
                self._root(group), group, rows[0], "after-claim-rename", _swap_in_symlink
            )
        if group == "truncate":
            return run_paused(self._root(group), group, rows[0], "stage-copied", _truncate)
        if group == "grow":
            return run_growing(self._root(group), group, rows[0], every=0.2, seconds=4)
        if group == "grow-slow":
            return run_growing(self._root(group), group, rows[0], every=2, seconds=60)
        return run_batch(self._root(group), group, rows)

    def close(self) -> None:
        for run in self.runs.values():
            if run.h.proc is not None and run.h.proc.poll() is None:
                run.h.proc.kill()
                run.h.proc.wait()
        for root in self.user_roots:
            shutil.rmtree(root, ignore_errors=True)


OUTCOMES: dict[str, str] = {}  # row key -> outcome observed (for the figures)
# what the daemon logs when a pause seam did its work (else the row proves nothing)
SEAM_EVIDENCE = {
    "symlink-swapped-in": "not a regular file when claimed",
    "truncated-mid-copy": "the file changed during the copy",
}


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Runs]:
    made = Runs(tmp_path_factory, request)
    yield made
    made.close()
    _write_figures(made)


def _write_figures(made: Runs) -> None:
    if not OUTCOMES:
        return
    counts: dict[str, int] = {}
    for outcome in OUTCOMES.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    default = {r.key for r in ROWS if not r.slow}
    slow = {r.key for r in ROWS if r.slow}
    case = (
        "catalogue" if default <= set(OUTCOMES) else "slow" if set(OUTCOMES) <= slow else "partial"
    )
    figures.record(
        "hostile_inputs",
        case,
        {
            "inputs": len(OUTCOMES),
            "catalogue_rows": len(ROWS),
            "deposited": counts.get("deposited", 0),
            "rejected": counts.get("rejected", 0),
            "left_in_place": counts.get("left-in-place", 0),
            "failed": counts.get("failed", 0),
            "losses": counts.get("lost", 0),
            "daemon_runs": len(made.runs),
            "rows": dict(sorted(OUTCOMES.items())),
        },
    )


# --- the per-row assertions -----------------------------------------------------------------


def check_deposited(run: Run, row: Row, expect: Deposited) -> None:
    made = run.made[row.key]
    receipts = [r for r in run.receipts if r["id"] == expect.id]
    assert len(receipts) == 1, f"{row.key}: receipts {receipts}"
    stored = run.h.archive / "resources" / expect.stored[:2] / expect.stored
    assert fingerprint(stored) == run.expected[row.key], f"{row.key}: archived bytes differ"
    assert not os.path.lexists(made.path), f"{row.key}: source still in the inbox"
    assert receipts[0]["source"] == str(made.path)
    with run.h.open_registry() as registry:
        record = registry.get_resource(expect.id)
    assert record is not None and record.sha1 == receipts[0]["sha1"]
    assert not any(r["original_path"] == str(made.path) for r in run.reasons.values())


def check_rejected(run: Run, row: Row, expect: Rejected) -> None:
    made = run.made[row.key]
    reason = run.reasons.get(str(made.path))
    assert reason is not None, f"{row.key}: no reason names {made.path!r}"
    assert reason["code"] == expect.code, f"{row.key}: {reason['code']}: {reason['message']}"
    assert reason["message"] and "time" in reason
    rejected = Path(reason["rejected_path"])
    assert rejected.parent == Path(reason["_file"]).parent
    assert fingerprint(rejected) == run.expected[row.key], f"{row.key}: rejected entry differs"
    assert not os.path.lexists(made.path), f"{row.key}: still in the inbox"
    for suffix in expect.companions:
        assert os.path.lexists(str(rejected) + suffix), f"{row.key}: {suffix} not moved along"
        assert not os.path.lexists(str(made.path) + suffix)
    assert not any(r["source"] == str(made.path) for r in run.receipts)


def check_left(run: Run, row: Row, expect: LeftInPlace) -> None:
    made = run.made[row.key]
    assert run.explains[row.key]["state"] == expect.explain
    assert fingerprint(made.path) == run.expected[row.key], f"{row.key}: content changed"
    st = os.lstat(made.path)
    assert (st.st_ino, st.st_mtime_ns) == run.identity[row.key], f"{row.key}: inode/mtime moved"
    assert not any(r["source"] == str(made.path) for r in run.receipts)
    assert not any(r["original_path"] == str(made.path) for r in run.reasons.values())


def _params() -> list[Any]:
    marks = {True: [pytest.mark.slow], False: []}
    return [pytest.param(r, id=r.key, marks=marks[r.slow]) for r in ROWS]


@pytest.mark.parametrize("row", _params())
def test_row_ends_in_its_one_expected_outcome(runs: Runs, row: Row) -> None:
    """The input ends exactly as its catalogue row says, with its bytes intact."""
    run = runs.get(row.group)
    OUTCOMES[row.key] = "failed"
    expect = row.expect
    if isinstance(expect, Deposited):
        check_deposited(run, row, expect)
    elif isinstance(expect, Rejected):
        check_rejected(run, row, expect)
    else:
        check_left(run, row, expect)
    if row.key in SEAM_EVIDENCE:
        assert SEAM_EVIDENCE[row.key] in run.log
    OUTCOMES[row.key] = expect.kind


# --- whole-run assertions -------------------------------------------------------------------

GROUPS = sorted({r.group for r in ROWS if not r.slow})


@pytest.mark.parametrize("group", GROUPS)
def test_nothing_written_outside_archive_inbox_and_state(runs: Runs, group: str) -> None:
    """The sentinel folder and /etc/passwd are unchanged; every new path is in a known place."""
    run = runs.get(group)
    assert _tree_state(run.ctx.outside) == run.outside_before
    assert _passwd() == run.passwd_before
    allowed = {run.h.inbox.name, run.h.archive.name, run.h.state_dir.name, "outside", "scratch"}
    stray = [p.name for p in run.h.root.iterdir() if p.name not in allowed | HARNESS_FILES]
    assert stray == [], f"unexpected paths next to the inbox: {stray}"
    assert not (run.h.root / "pwned").exists()
    archive = run.h.archive
    top = sorted(p.name for p in archive.iterdir())
    assert top == sorted([".gitignore", "README.md", "nbank.json", "resources", "staging"])
    assert list((archive / "staging").iterdir()) == []
    stored = sorted(p.name for sub in (archive / "resources").iterdir() for p in sub.iterdir())
    expected = sorted(
        r.expect.stored for r in ROWS if r.group == group and isinstance(r.expect, Deposited)
    )
    assert stored == expected


@pytest.mark.parametrize("group", GROUPS)
def test_daemon_hit_no_unexpected_error(runs: Runs, group: str) -> None:
    """No hostile input made the daemon log a traceback (a bug, even when nothing was lost)."""
    run = runs.get(group)
    assert "unexpected error" not in run.log and "Traceback" not in run.log


EMPTY = ("file", hashlib.sha1(b"").hexdigest(), 0)


def _places(run: Run, group: str) -> list[tuple[object, ...]]:
    """The fingerprint of everything in the archive's resources and anywhere in the inbox."""
    out: list[tuple[object, ...]] = []
    resources = run.h.archive / "resources"
    for sub in resources.iterdir() if resources.is_dir() else []:
        out += [fingerprint(p) for p in sub.iterdir()]
    for dirpath, dirnames, filenames in os.walk(run.h.inbox):
        names = filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        out += [fingerprint(os.path.join(dirpath, n)) for n in names]
    if group == "dirs":  # folder resources: the whole tree is the input
        for top in (run.h.inbox, run.h.rejected):
            out += [
                fingerprint(p)
                for p in top.iterdir()
                if p.is_dir() and not p.is_symlink() and p.name not in (".nbank", "rejected")
            ]
    return out


@pytest.mark.parametrize("group", GROUPS)
def test_every_input_is_found_exactly_once(runs: Runs, group: str) -> None:
    """Each input's bytes are in exactly one of archive, rejected folder or inbox: none lost."""
    run = runs.get(group)
    places = _places(run, group)
    rows = [r for r in ROWS if r.group == group]
    problems = []
    for row in rows:
        fp = run.expected[row.key]
        found = places.count(fp)
        meant = sum(1 for r in rows if run.expected[r.key] == fp)  # duplicate-content rows
        if found == 0:
            OUTCOMES[row.key] = "lost"
            problems.append(f"{row.key} lost")
        elif found != meant and fp != EMPTY:  # markers are empty files too
            problems.append(f"{row.key} found {found} times")
    assert problems == []
