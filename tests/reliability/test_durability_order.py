"""Durability ordering: every step is fsynced before the next one relies on it.

``kill -9`` keeps the page cache, so crash tests cannot show what a power cut
would lose. Instead the real daemon runs under ``strace -f -y`` while it deposits
a few files and rejects one; the trace (each worker thread's system calls, in
order, with the path behind every descriptor) is parsed and, for each input,
the durable operations must come in this order:

- the staged copy is fsynced before it is linked into ``resources/``, and the
  registry's commit (embedded registry: its SQLite WAL) lands in between;
- the stub folder in ``resources/`` is fsynced after the link and before the
  source is removed;
- the receipt is fsynced, then the journal commit recording the deposit (the
  journal's WAL is synced, by this worker or by another worker leading a group
  commit that holds this save), then the claimed source in ``<inbox>/.nbank/``
  is unlinked; nothing touches the input's files after that unlink;
- the intent is journaled (a WAL sync) before the claim rename, and the rename is
  made durable (both folders fsynced) before the input's bytes are staged; the
  transitions between (claimed, staged, ...) are committed without an fsync
  (``lifecycle.DURABLE``): after a power loss recovery repeats those steps;
- a rejected input's ``NAME.reason`` is fsynced and renamed (or linked) into
  place, and the rejected folder fsynced, before the input is moved next to it.

strace must be installed (``apt-get install strace``); the test fails, never
skips, without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.daemon import DaemonHarness, wait_for
from nbankd.control.client import call
from reliability.invariants import Input, check, journal_in_flight, read_reasons, read_receipts

SYSCALLS = (
    "fsync",
    "fdatasync",
    "openat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "unlink",
    "unlinkat",
    "mkdir",
)
SYNCS = frozenset({"fsync", "fdatasync"})
RENAMES = frozenset({"rename", "renameat", "renameat2"})
LINKS = frozenset({"link", "linkat"})
UNLINKS = frozenset({"unlink", "unlinkat"})

_LINE = re.compile(r"^(\d+)\s+(?:\d\d:\d\d:\d\d\.\d+\s+)?(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_PATH = re.compile(r"<(/[^<>]*)>")
_RESULT = re.compile(r"^(.*)\)\s+=\s+(-?\d+)")


@dataclass(frozen=True)
class Call:
    """One completed system call: where it started and ended in the trace."""

    start: int
    end: int
    tid: int
    name: str
    args: str
    ret: int

    @property
    def paths(self) -> list[str]:
        return self.names + _FD_PATH.findall(self.args)

    @property
    def names(self) -> list[str]:
        """The paths the call names: its string arguments, each joined to the folder
        descriptor before it for the ``*at`` calls (``renameat2(5</in>, "a", ...)``
        names ``/in/a``)."""
        if not self.name.endswith("at") and self.name != "renameat2":
            return _STRING.findall(self.args)
        out: list[str] = []
        folder = ""
        for arg in _split_args(self.args):
            fd_path = _FD_PATH.search(arg)
            string = _STRING.fullmatch(arg.strip())
            if string is not None:
                out.append(os.path.join(folder, string.group(1)) if folder else string.group(1))
                folder = ""
            elif fd_path is not None:
                folder = fd_path.group(1)
            elif arg.strip() == "AT_FDCWD":
                folder = ""
        return out

    @property
    def ok(self) -> bool:
        return self.ret >= 0

    def __str__(self) -> str:
        return f"line {self.start + 1} [{self.tid}] {self.name}({self.args}) = {self.ret}"


def _split_args(args: str) -> list[str]:
    """Top-level arguments of a call (commas inside strings and <paths> kept)."""
    out, depth, quoted, cur, escaped = [], 0, False, [], False
    for ch in args:
        if quoted:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_trace(text: str) -> list[Call]:
    """Completed calls from ``strace -f -o FILE`` output (unfinished/resumed pairs joined)."""
    calls: list[Call] = []
    pending: dict[int, tuple[int, str]] = {}
    for idx, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw)
        if m is None:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if rest.startswith(("---", "+++")):
            continue
        start = idx
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            if tid not in pending:
                continue
            start, head = pending.pop(tid)
            rest = head + resumed.group(2)
        elif rest.endswith("<unfinished ...>"):
            pending[tid] = (idx, rest.removesuffix("<unfinished ...>").rstrip())
            continue
        name, paren, body = rest.partition("(")
        result = _RESULT.match(body)  # strace pads short lines before " = "
        if not paren or result is None:
            continue
        calls.append(Call(start, idx, tid, name, result.group(1), int(result.group(2))))
    return calls


class Trace:
    def __init__(self, calls: list[Call]) -> None:
        self.calls = [c for c in calls if c.ok]

    def find(
        self,
        names: Iterable[str],
        match: Callable[[Call], bool],
        *,
        tid: int | None = None,
        after: int = -1,
        before: int | None = None,
    ) -> list[Call]:
        """Calls named ``names`` that match, started after ``after`` and ended before ``before``."""
        wanted = set(names)
        return [
            c
            for c in self.calls
            if c.name in wanted
            and (tid is None or c.tid == tid)
            and c.start > after
            and (before is None or c.end < before)
            and match(c)
        ]

    def one(self, names: Iterable[str], match: Callable[[Call], bool], what: str) -> Call:
        found = self.find(names, match)
        assert found, f"no {what} in the trace"
        return found[-1]


def fd_is(path: str) -> Callable[[Call], bool]:
    """The call's first argument is a descriptor open on exactly ``path``."""
    return lambda c: _FD_PATH.search(c.args) is not None and _FD_PATH.findall(c.args)[0] == path


def names(*paths: str) -> Callable[[Call], bool]:
    """The call names exactly ``paths`` (in order; see :attr:`Call.names`)."""
    return lambda c: c.names == list(paths)


def ends_with(suffix: str) -> Callable[[Call], bool]:
    return lambda c: bool(_FD_PATH.findall(c.args)) and _FD_PATH.findall(c.args)[0].endswith(suffix)


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.fail(
            "strace is not installed: the durability ordering test needs it "
            "(apt-get install strace)"
        )
    return path


def _journal_items(state_dir: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM items ORDER BY id")]
    finally:
        db.close()


def test_durable_operations_come_in_a_crash_safe_order(
    daemon_factory: Callable[..., DaemonHarness], tmp_path: Path
) -> None:
    """Each publish, journal commit and source removal comes after the fsyncs it relies on."""
    h = daemon_factory()
    trace_path = tmp_path / "strace.txt"  # kept after the test for a look at a failure
    h.wrap_argv = [_strace(), "-f", "-y", "-qq", "-o", str(trace_path)]
    h.wrap_argv += ["-e", "trace=" + ",".join(SYSCALLS)]
    h.start(timeout=60)
    inputs = [
        Input(h.inbox, "ord1.bin", data=os.urandom(200_000), expect="deposited"),
        Input(h.inbox, "ord2.bin", data=os.urandom(1 << 20), expect="deposited"),
        Input(
            h.inbox,
            "ord3.wav",
            data=os.urandom(5_000),
            sidecar=b"metadata: {rig: r3}\n",
            expect="deposited",
        ),
        Input(h.inbox, "bad name.bin", data=os.urandom(3_000), expect="rejected"),
    ]
    for inp in inputs:
        inp.write(h.root)

    def settled() -> bool:
        try:
            done = len(read_receipts(h.state_dir)) + len(read_reasons(h.rejected))
        except (AssertionError, ValueError):
            return False  # a receipt line or reason being written right now
        return done >= len(inputs) and not journal_in_flight(h.state_dir)

    wait_for(settled, 60, "the inputs to be deposited or rejected under strace")
    os.kill(call(h.socket_path, "status")["pid"], signal.SIGTERM)  # the daemon, not strace
    assert h.wait_exit(timeout=60) == 0
    check(h, inputs)

    trace = Trace(parse_trace(trace_path.read_text(errors="replace")))
    root = os.path.realpath(h.root)
    inbox, work_dir = f"{root}/inbox", f"{root}/inbox/.nbank"
    archive = os.path.realpath(h.archive)
    staging = f"{archive}/staging"
    wal = f"{os.path.realpath(h.state_dir)}/journal.sqlite3-wal"
    registry_wal = f"{os.path.realpath(h.state_dir)}/registry.sqlite3-wal"
    receipts = {r["token"]: r for r in read_receipts(h.state_dir)}
    items = _journal_items(h.state_dir)
    assert sorted(str(i["state"]) for i in items) == ["done", "done", "done", "rejected"]

    for item in items:
        token = str(item["token"])
        relpath = os.fsdecode(item["relpath"])  # type: ignore[arg-type]
        work = f"{work_dir}/{token}"
        claim = trace.one(RENAMES, names(f"{inbox}/{relpath}", work), f"claim rename of {relpath}")
        x = claim.tid  # a worker drives one item from claim to its end
        assert trace.find(SYNCS, fd_is(wal), before=claim.start), (
            f"{relpath}: renamed into .nbank/ before any journal commit (the intent)"
        )
        next_write = [
            c
            for c in trace.calls
            if c.tid == x and c.start > claim.end and c.name == "openat" and "O_CREAT" in c.args
        ]
        assert next_write, f"{relpath}: nothing written after the claim"
        for folder in (work_dir, inbox):
            assert trace.find(
                SYNCS, fd_is(folder), tid=x, after=claim.end, before=next_write[0].start
            ), f"{relpath}: {folder} is not fsynced between the claim rename and the staging"
        if item["state"] == "done":
            staged = f"{staging}/{json.loads(str(item['staged_identity']))['name']}"
            _check_deposit(
                trace, relpath, token, work, x, receipts[token], staged, wal, registry_wal
            )
        else:
            _check_rejection(trace, h, relpath, token, item)


def _check_deposit(
    trace: Trace,
    relpath: str,
    token: str,
    work: str,
    x: int,
    receipt: dict[str, str],
    staged: str,
    wal: str,
    registry_wal: str,
) -> None:
    target = os.path.realpath(receipt["archive_path"])
    link = trace.one(LINKS, names(staged, target), f"link of {relpath} into resources/")
    created = trace.one(
        {"openat"},
        lambda c: c.names == [staged] and "O_CREAT" in c.args,
        f"creation of the staged copy of {relpath}",
    )
    assert trace.find(SYNCS, fd_is(staged), after=created.end, before=link.start), (
        f"{relpath}: linked into resources/ before its staged data was fsynced"
    )
    assert trace.find(SYNCS, fd_is(registry_wal), tid=x, after=created.end, before=link.start), (
        f"{relpath}: published before the registry's commit was synced"
    )
    unlink = trace.one(UNLINKS, names(work), f"removal of the claimed source of {relpath}")
    assert trace.find(SYNCS, fd_is(os.path.dirname(target)), after=link.end, before=unlink.start), (
        f"{relpath}: source removed before the resources/ folder was fsynced after the link"
    )
    receipt_sync = trace.find(
        SYNCS, ends_with(".jsonl"), tid=x, after=link.end, before=unlink.start
    )
    assert receipt_sync, f"{relpath}: source removed before its receipt was fsynced"
    # the commit recording the deposit may be synced by another worker (group commit)
    assert trace.find(SYNCS, fd_is(wal), after=receipt_sync[-1].end, before=unlink.start), (
        f"{relpath}: source removed before the journal commit recording the deposit"
    )
    later = [
        c
        for c in trace.calls
        if c.start > unlink.end
        and c.name not in SYNCS
        and any(p in (work, staged, target) for p in c.paths)
    ]
    assert not later, f"{relpath}: touched after its source was removed: {[str(c) for c in later]}"


def _check_rejection(
    trace: Trace, h: DaemonHarness, relpath: str, token: str, item: dict[str, object]
) -> None:
    rejected = os.path.realpath(h.rejected)
    name = os.fsdecode(item["rejected_relpath"])  # type: ignore[arg-type]
    reason = f"{rejected}/{name}.reason"
    temp = f"{rejected}/.{name}.reason.tmp"
    work = f"{os.path.realpath(h.inbox)}/.nbank/{token}"
    move = trace.one(RENAMES | LINKS, names(work, f"{rejected}/{name}"), f"move of {relpath}")
    placed = trace.one(RENAMES | LINKS, names(temp, reason), f"{name}.reason put in place")
    assert trace.find(SYNCS, fd_is(temp), before=placed.start), (
        f"{relpath}: {name}.reason renamed into place before its bytes were fsynced"
    )
    assert placed.end < move.start, f"{relpath}: moved before its reason was in place"
    assert trace.find(SYNCS, fd_is(rejected), after=placed.end, before=move.start), (
        f"{relpath}: moved before the rejected folder was fsynced after its reason"
    )
    assert json.loads(Path(reason).read_text())["code"] == "invalid-name"
