"""Damaged copies of deposited inputs: a claimed input the release finds, after a
restart of the machine, no larger and no newer than claimed (as a power loss leaves a
file) but not removable as power-loss damage (its status changed since the claim:
someone may have written it and set its time back) goes back into the inbox whole,
never removed. Seen again there unchanged since it was put back (the same file: its
device and inode, and its ctime as the put-back left it; or, its ctime moved, as after
a rejection and a requeue, the same size, mtime and SHA-1 as put back), it is rejected
as a damaged (partial) copy of the resource deposited from it, kept in the rejected
folder: never deposited again, under its own name (``name-taken``) or, with
``auto_id``, as a new resource. Any other file is deposited as usual, a new recording
given the inode number of a deleted damaged copy and an older mtime (cp -p, rsync -t)
too: inode numbers are reused and mtimes set by whoever copies a file, so neither
alone says a file is the damaged copy.

The release marks the item's identity (:data:`DAMAGED_KEY`: the deposit it is a
damaged copy of, and once put back the put-back file's status and SHA-1); the put-back
notes it in :class:`DamagedCopies`, which the claim asks (a dict lookup: nothing is
read from the journal per claim); a daemon started again reads the marks of items put
back in the last :data:`REMEMBERED_SECONDS` from the journal once, at its first claim.
A mark without the put-back's status (a crash between the put-back and its journal
entry, or a release before this one) never rejects anything.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbankd import hashing
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import Outcome, State

#: the key of a claimed input's identity marking it put back as a damaged copy
DAMAGED_KEY = "damaged_copy"
#: how long (seconds) after its put-back a damaged copy is still told apart by a daemon
#: started again since (the daemon that put it back tells it apart as long as it runs)
REMEMBERED_SECONDS = 30 * 86400
#: the put-back's code, and the code of the rejection of the copy put back
PUT_BACK_CODE = "changed-after-restart"
CODE = "damaged-copy"


def no_larger_no_newer(claimed: Mapping[str, Any], now: Mapping[str, int]) -> bool:
    """True when an input (``now``: its size and mtime) is no larger and its mtime no
    later than its ``claimed`` identity recorded: what a power loss leaves, whatever
    its ctime says."""
    return all(isinstance(claimed.get(f), int) and now[f] <= claimed[f] for f in _FIELDS)


_FIELDS = ("size", "mtime_ns")


def marked(identity: str) -> str:
    """The claim's ``identity`` marked: its input goes back as a damaged copy."""
    return json.dumps({**json.loads(identity), DAMAGED_KEY: True})


def is_marked(identity: str | None) -> bool:
    """True when a claim's ``identity`` marks its input put back as a damaged copy."""
    return identity is not None and DAMAGED_KEY in identity and bool(_mark(identity))


def noted(item: Item, put_back: Mapping[str, Any], sha1: str | None) -> str:
    """The marked identity of ``item``, once put back: the mark says what the put-back
    file is (a damaged copy of the deposit: its identifier, size and SHA-1) and the
    put-back file's status (``put_back``: device, inode, size, mtime, ctime) and SHA-1
    (None for a folder), by which its next claim tells it apart."""
    assert item.identity is not None
    mark = {
        "of": item.name,
        "deposit_sha1": item.sha1,
        "deposit_size": item.size,
        "put_back": {k: int(put_back[k]) for k in (*_FIELDS, "dev", "ino", "ctime_ns")},
        "sha1": sha1,
    }
    return json.dumps({**json.loads(item.identity), DAMAGED_KEY: mark})


def file_sha1(path: Path) -> str:
    """The SHA-1 of the file at ``path`` (a damaged copy: no larger than its deposit),
    never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hashing.sha1_stream(fd)
    finally:
        os.close(fd)


def _mark(identity: str) -> Any:
    return json.loads(identity).get(DAMAGED_KEY)


def put_back(shown: str, identifier: str | None) -> Outcome:
    """At release, after a restart of the machine: the input is no larger and no newer
    than claimed, its status changed since: put back whole (never removed), to be
    rejected as a damaged copy when it is claimed again."""
    return Outcome(
        "changed",
        PUT_BACK_CODE,
        f"{shown} changed across a restart of the machine after it was deposited as "
        f"{identifier}: no larger and no newer than the deposited copy (as a power loss "
        "leaves a file), but its status changed since its claim, so it is not removed: it "
        f"goes back into the inbox, where it is rejected as a damaged copy of {identifier}",
        f"nothing to do: the archive keeps the whole copy of {identifier}",
    )


@dataclass(frozen=True)
class _Deposit:
    """What a damaged copy's rejection tells of the deposit it is a copy of."""

    name: str | None
    sha1: str | None
    size: int | None
    #: the put-back file's device, inode, size, mtime and ctime
    put_back: Mapping[str, int]
    #: the put-back file's SHA-1 (None: a folder)
    copy_sha1: str | None


class DamagedCopies:
    """The inputs put back as damaged copies, by (device, inode), and their deposits."""

    def __init__(self, journal: Journal, clock: Callable[[], float]) -> None:
        self._journal = journal
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[tuple[int, int], _Deposit] | None = None  # None: not read yet

    def put_back(self, item: Item) -> None:
        """Notes ``item``, being put back, when its release marked it a damaged copy."""
        found = _entry(item.name, item.sha1, item.size, item.identity)
        if found is not None:
            with self._lock:
                self._loaded()[found[0]] = found[1]

    def judge(self, item: Item, shown: str, work: Path) -> Outcome | None:
        """At claim (its identity recorded, the input at ``work``): the rejection of an
        input that is a damaged copy put back, unchanged since; None for any other."""
        if item.identity is None:
            return None
        now = json.loads(item.identity)
        with self._lock:
            deposit = self._loaded().get(_key(now))
        if deposit is None or not _unchanged(deposit, item, now, work):
            return None  # another file in that inode, or written since: a new recording
        name = deposit.name
        return Outcome(
            "permanent",
            CODE,
            f"{shown} is a damaged (partial) copy of {name}, which was deposited whole "
            f"before a restart of the machine (sha1 {deposit.sha1}, {deposit.size} bytes): "
            "after the restart this file was found no larger and no newer than the "
            "deposited copy, as a power loss leaves one; it is not deposited again",
            f"nothing to deposit: the archive's copy of {name} is the whole one (see "
            f"'nbankctl locate {name}'); this file is the one put back, unchanged since, "
            "so you may delete it once you have checked it against the deposit. To "
            "deposit these bytes anyway, as a new resource, copy (not move) them into the "
            "inbox under another name",
        )

    def _loaded(self) -> dict[tuple[int, int], _Deposit]:
        """The damaged copies known (read from the journal the first time: those put
        back in the last REMEMBERED_SECONDS). Called with the lock held."""
        if self._known is None:
            since = self._clock() - REMEMBERED_SECONDS
            rows = self._journal.identities_since(State.RETURNED, since, f'"{DAMAGED_KEY}"')
            found = (_entry(*row) for row in rows)
            self._known = dict(f for f in found if f is not None)
        return self._known


def _unchanged(deposit: _Deposit, item: Item, now: Mapping[str, Any], work: Path) -> bool:
    """True when the input claimed (``now``, at ``work``) is the damaged copy put back,
    unchanged since: its ctime as the scan saw it before the claim is the put-back's
    (any write, chmod, or another file in the inode moves it), or, its ctime moved (a
    rejection and a requeue move it), a file of the same size, mtime and SHA-1."""
    seen = json.loads(item.seen_identity or "{}")
    ctime = (seen.get("tree") if item.kind == "dir" else seen) or {}
    if ctime.get("ctime_ns") == deposit.put_back["ctime_ns"]:
        return True
    if deposit.copy_sha1 is None or item.kind == "dir":
        return False
    if any(now.get(f) != deposit.put_back[f] for f in _FIELDS):
        return False
    try:
        return file_sha1(work) == deposit.copy_sha1
    except OSError:
        return False  # unreadable: the claim's own reading tells why


def _entry(
    name: str | None, sha1: str | None, size: int | None, identity: str | None
) -> tuple[tuple[int, int], _Deposit] | None:
    """The put-back file's (device, inode) and deposit (``name``, ``sha1``, ``size``),
    when the item's ``identity`` marks a damaged copy put back (a mark without the
    put-back's status never rejects)."""
    if identity is None or DAMAGED_KEY not in identity:
        return None
    try:
        mark = _mark(identity)
    except (ValueError, AttributeError, RecursionError):  # not an identity nbankd wrote
        return None
    if not isinstance(mark, dict) or not isinstance(mark.get("put_back"), dict):
        return None
    back = mark["put_back"]
    return _key(back), _Deposit(
        name=name, sha1=sha1, size=size, put_back=back, copy_sha1=mark.get("sha1")
    )


def _key(identity: Mapping[str, Any]) -> tuple[int, int]:
    """An identity's (device, inode); (-1, -1), which no file has, when not recorded."""
    return int(identity.get("dev", -1)), int(identity.get("ino", -1))
