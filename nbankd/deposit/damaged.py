"""Damaged copies of deposited inputs: a claimed input the release finds, after a
restart of the machine, no larger and no newer than claimed (as a power loss leaves a
file) but not removable as power-loss damage (its status changed since the claim:
someone may have written it and set its time back) goes back into the inbox whole,
never removed. Seen again there unchanged (the same file: its device, inode, and no
larger, no newer than claimed), it is rejected as a damaged (partial) copy of the
resource deposited from it, kept in the rejected folder: never deposited again, under
its own name (``name-taken``) or, with ``auto_id``, as a new resource.

The release marks the item's identity (:data:`DAMAGED_KEY`); the put-back notes it in
:class:`DamagedCopies`, which the claim asks (a set lookup: nothing is read from the
journal per claim); a daemon started again reads the marks of items put back in the
last :data:`REMEMBERED_SECONDS` from the journal once, at its first claim.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
    claimed: Mapping[str, Any]


class DamagedCopies:
    """The inputs put back as damaged copies, by (device, inode), and their deposits."""

    def __init__(self, journal: Journal, clock: Callable[[], float]) -> None:
        self._journal = journal
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[tuple[int, int], _Deposit] | None = None  # None: not read yet

    def put_back(self, item: Item) -> None:
        """Notes ``item``, being put back, when its release marked it a damaged copy."""
        found = _entry(item)
        if found is not None:
            with self._lock:
                self._loaded()[found[0]] = found[1]

    def judge(self, item: Item, shown: str) -> Outcome | None:
        """At claim (its identity recorded): the rejection of an input that is a damaged
        copy put back, unchanged since; None for any other input."""
        if item.identity is None:
            return None
        now = json.loads(item.identity)
        with self._lock:
            deposit = self._loaded().get(_key(now))
        if deposit is None or not no_larger_no_newer(deposit.claimed, now):
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
            f"'nbankctl locate {name}'); delete this damaged copy once you have checked "
            "it. To deposit these bytes anyway, as a new resource, copy them into the "
            "inbox under another name",
        )

    def _loaded(self) -> dict[tuple[int, int], _Deposit]:
        """The damaged copies known (read from the journal the first time: those put
        back in the last REMEMBERED_SECONDS). Called with the lock held."""
        if self._known is None:
            since = self._clock() - REMEMBERED_SECONDS
            found = (_entry(i) for i in self._journal.finished_since(State.RETURNED, since))
            self._known = dict(f for f in found if f is not None)
        return self._known


def _entry(item: Item) -> tuple[tuple[int, int], _Deposit] | None:
    """``item``'s (device, inode) and deposit, when its identity marks a damaged copy."""
    if item.identity is None or DAMAGED_KEY not in item.identity:
        return None
    claimed = json.loads(item.identity)
    if not claimed.get(DAMAGED_KEY) or "dev" not in claimed or "ino" not in claimed:
        return None
    return _key(claimed), _Deposit(name=item.name, sha1=item.sha1, size=item.size, claimed=claimed)


def _key(identity: Mapping[str, Any]) -> tuple[int, int]:
    """An identity's (device, inode); (-1, -1), which no file has, when not recorded."""
    return int(identity.get("dev", -1)), int(identity.get("ino", -1))
