"""Identities of inputs and staged copies: what was recorded, and whether a file is
still it. Each is journaled as JSON by the step that saw it and compared by later
steps (a changed input is put back, a replaced staged copy is made again).
"""

from __future__ import annotations

import enum
import functools
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nbankd.mounts import mount_key
from nbankd.watch.identity import (
    Identity,
    TreeSummary,
    identity_of_path,
    tree_identity,
    tree_summary,
)

IDENTITY_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


@functools.lru_cache(maxsize=1024)
def _recorded(text: str) -> Mapping[str, Any]:
    """A journaled identity (JSON text) as a read-only mapping, parsed once per text:
    every step of every deposit compares what it finds with one or two of them."""
    return MappingProxyType(json.loads(text))


def identity_json(path: Path, is_dir: bool) -> str:
    """The identity journaled at claim: IDENTITY_FIELDS, and ``boot``, the machine's
    boot id then (a change found after a restart of the machine is told apart)."""
    ident = tree_identity(path) if is_dir else identity_of_path(path)
    return json.dumps({**{k: getattr(ident, k) for k in IDENTITY_FIELDS}, "boot": boot_id()})


def reidentified(recorded: str | None, path: Path, is_dir: bool) -> str:
    """The identity of a claimed input at ``path`` as it is now, with the boot id of
    the one ``recorded`` at its claim (a change after a restart is still told apart)
    and the ready marker it recorded."""
    fresh = json.loads(identity_json(path, is_dir))
    if recorded is not None:
        fresh["boot"] = _recorded(recorded).get("boot", fresh["boot"])
    return renewed(recorded, fresh)


def renewed(recorded: str | None, fresh: Mapping[str, Any]) -> str:
    """An identity taken anew (``fresh``) of an input whose claim ``recorded`` one: what
    the claim recorded of its ready marker is kept (see :func:`marker_is_claimed`)."""
    out = dict(fresh)
    if recorded is not None and MARKER_KEY in _recorded(recorded):
        out[MARKER_KEY] = _recorded(recorded)[MARKER_KEY]
    return json.dumps(out)


# -- the ready marker (``NAME.done``) as the claim found it ----------------------------

#: the key of the claim's identity holding its ready marker's (absent: an identity of
#: an older release, which recorded none; null: no marker was there at the claim)
MARKER_KEY = "marker"
MARKER_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")
#: what setting a marker again changes (creating, writing or touching it moves its
#: modification time): its mode, owner, ACL or xattrs changed (``chmod -R g+w`` over
#: an inbox, a backup tool), which move only its ctime, or a remount that numbers it
#: anew, leave it the marker its claim found
MARKER_SET_AGAIN = ("size", "mtime_ns")


def marker_status(st: os.stat_result | None) -> dict[str, int] | None:
    """MARKER_FIELDS' values of a ready marker's status (None: no marker there)."""
    return None if st is None else {f: getattr(st, "st_" + f) for f in MARKER_FIELDS}


def marker_seen(path: Path) -> dict[str, int] | None:
    """:func:`marker_status` of the ready marker at ``path`` (None: none, or it cannot
    be read): what an intent notes of it, for a claim resumed after a crash."""
    try:
        return marker_status(os.lstat(path))
    except OSError:
        return None


def same_marker(noted: Mapping[str, int] | None, now: Mapping[str, int] | None) -> bool:
    """True when a marker status ``noted`` earlier is still the marker found ``now``:
    both absent, or neither set again since (MARKER_SET_AGAIN)."""
    if noted is None or now is None:
        return noted is None and now is None
    return all(noted.get(f) == now.get(f) for f in MARKER_SET_AGAIN)


def with_marker(identity: str, st: os.stat_result | None) -> str:
    """The claim's ``identity`` with its ready marker's status (``st``; None: none was
    there), compared at the release (:func:`marker_is_claimed`)."""
    return with_marker_status(identity, marker_status(st))


def with_marker_status(identity: str, marker: Mapping[str, int] | None) -> str:
    """:func:`with_marker` of a status already read (MARKER_FIELDS' values, or None)."""
    return json.dumps({**_recorded(identity), MARKER_KEY: None if marker is None else dict(marker)})


def marker_is_claimed(recorded: str | None, now: Mapping[str, int]) -> bool:
    """True when the ready marker found at the release (``now``: MARKER_FIELDS' values)
    is the one the claim found (``recorded``: the claim's identity), so that it marks the
    recording claimed and is removed with it. False when the claim found none or
    another: set (created, written or touched) since the claim, it marks the next
    recording of the name, and is left for it. An identity without a marker's (an older
    release's, or none) counts the marker found as the claimed one, as those releases
    did."""
    if recorded is None or MARKER_KEY not in _recorded(recorded):
        return True
    want = _recorded(recorded)[MARKER_KEY]
    return want is not None and all(want.get(f) == now.get(f) for f in MARKER_SET_AGAIN)


# -- a change found after a restart of the machine -------------------------------------

#: what a power loss can only take back, never move forward: the input's size (its
#: unflushed bytes lost, or the whole file's for a folder), and its modification and
#: change times (a write, a truncation or a status change not yet on disk is lost with
#: its time; any made after the claim sets a later one, and no program sets a ctime)
POWER_LOSS_FIELDS = ("size", "mtime_ns", "ctime_ns")


def power_loss_only(claimed: Mapping[str, Any], now: Mapping[str, int]) -> bool:
    """True when an input found after a restart of the machine (``now``: IDENTITY_FIELDS'
    values, of a file or a folder's tree) differs from its ``claimed`` identity only as
    a power loss can leave it: no larger, and neither its modification nor its change
    time later than the claim recorded (a stale, truncated or zero-filled file). A
    rewrite after the claim, even to the same size, moves both times forward: it is a
    writer's, never a power loss's. False when a field was not recorded."""
    return all(isinstance(claimed.get(f), int) and now[f] <= claimed[f] for f in POWER_LOSS_FIELDS)


def same_identity(recorded: str | None, path: Path, is_dir: bool) -> bool:
    if recorded is None:
        return False
    try:
        ident = tree_identity(path) if is_dir else identity_of_path(path)
    except FileNotFoundError:
        return False
    want = _recorded(recorded)
    return all(want.get(k) == getattr(ident, k) for k in IDENTITY_FIELDS)


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """This boot of the machine (/proc/sys/kernel/random/boot_id); "" when unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def restarted_since(recorded: str, created: float) -> bool:
    """True when the machine restarted since the identity ``recorded`` was taken: its
    boot id differs from this boot's; for an identity journaled without one (an older
    release), when the item's intent (``created``) is older than this boot."""
    then = _recorded(recorded).get("boot")
    if then is not None:
        return bool(then) and then != boot_id()
    return created < booted_at()


@functools.lru_cache(maxsize=1)
def booted_at() -> float:
    """When this machine started (``btime`` of /proc/stat, seconds since the epoch);
    0.0 when it cannot be read (nothing then counts as older than the boot)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


class Change(enum.Enum):
    """How an input compares with the identity its claim recorded."""

    SAME = "same"
    #: size and mtime as recorded, but its ctime moved (a mode, group, link or attribute)
    #: or its device and inode numbers (an SSHFS remount numbers files anew): maybe no
    #: byte changed, its SHA-1 tells
    UNSURE = "unsure"
    CONTENT = "content"  # size or mtime moved


def compare(recorded: str | None, path: Path, is_dir: bool) -> Change:
    """How ``path`` compares with the identity its claim recorded (SAME when none was
    recorded: an older journal). Raises FileNotFoundError when nothing is there."""
    if recorded is None:
        return Change.SAME
    if is_dir:
        return compare_stat(recorded, identity_fields(path))
    ident = identity_of_path(path)
    return compare_stat(recorded, {k: getattr(ident, k) for k in IDENTITY_FIELDS})


def identity_fields(folder: Path) -> dict[str, int]:
    """IDENTITY_FIELDS' values of a folder input's identity (its whole tree)."""
    ident = tree_identity(folder)
    return {k: getattr(ident, k) for k in IDENTITY_FIELDS}


def compare_stat(recorded: str, now: dict[str, int]) -> Change:
    """:func:`compare` of an identity already read (IDENTITY_FIELDS' values)."""
    want = _recorded(recorded)
    if all(want.get(key) == now.get(key) for key in IDENTITY_FIELDS):
        return Change.SAME
    if all(want.get(key) == now.get(key) for key in ("size", "mtime_ns")):
        return Change.UNSURE
    return Change.CONTENT


def stat_fields(st: os.stat_result) -> dict[str, int]:
    """IDENTITY_FIELDS' values of one stat result."""
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def staged_id(path: Path, st: os.stat_result | None = None) -> str:
    """The staged copy's name and identity, journaled with the step that wrote it
    (``st``: its status from the descriptor it was written through, else its name's)."""
    st = st if st is not None else os.lstat(path)
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    return json.dumps(
        {
            "name": path.name,
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": size,
            "mtime_ns": st.st_mtime_ns,
        }
    )


def staged_matches(recorded: str | None, path: Path) -> bool:
    """True when ``path`` is still the staged copy journaled (device, inode, size,
    mtime), or no identity was journaled (items of an older journal)."""
    if recorded is None:
        return True
    try:
        now = json.loads(staged_id(path))
    except OSError:
        return False
    want = _recorded(recorded)
    return all(now[key] == want.get(key) for key in _STAGED_KEYS)


_STAGED_KEYS = ("name", "dev", "ino", "size", "mtime_ns")


def mark_verified(recorded: str) -> str:
    """The journaled staged identity, noting that this copy was read back from storage
    and matched before it was published."""
    return json.dumps({**_recorded(recorded), "verified": True})


def verified_before_publish(recorded: str | None, path: Path) -> bool:
    """True when ``path`` is a regular file that is the very staged copy read back from
    storage before publishing (same device, inode, size and mtime; publishing links
    that inode): its bytes need no second read. Folders are always read again."""
    if recorded is None:
        return False
    want = _recorded(recorded)
    if not want.get("verified"):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        want.get("dev"),
        want.get("ino"),
        want.get("size"),
        want.get("mtime_ns"),
    )


def seen_matches(seen: str | None, st: os.stat_result) -> bool:
    """True when the entry about to be claimed is the one the scan saw (device and
    inode), or when no scan identity was recorded (items of an older journal)."""
    if seen is None:
        return True
    want = _recorded(seen)
    return (want.get("dev"), want.get("ino")) == (st.st_dev, st.st_ino)


def seen_unchanged(seen: str | None, st: os.stat_result) -> bool:
    """True when a file about to be claimed still has the size, modification and change
    times it settled with (when the scan recorded them: a plain file's intent)."""
    want = _recorded(seen) if seen is not None else {}
    return "size" not in want or _agrees(want, st, ("size", "mtime_ns", "ctime_ns"))


#: what a folder input's intent records of the tree that settled (besides the folder's
#: device and inode): :class:`~nbankd.watch.identity.TreeSummary`'s identity, whose
#: times are the largest over every node and whose digest covers every node's name,
#: inode, size, times and mode: any write, creation, removal or rename inside moves it
TREE_FIELDS = ("size", "mtime_ns", "ctime_ns", "nlink", "digest")


def tree_seen(ident: Identity) -> dict[str, int | str]:
    """The ``tree`` a folder input's intent records: TREE_FIELDS of the identity of the
    tree that settled (see :func:`seen_tree_unchanged`)."""
    return {k: getattr(ident, k) for k in TREE_FIELDS}


def tree_now(name: bytes, *, dir_fd: int) -> TreeSummary | None:
    """The summary of the folder ``name`` (in the open folder ``dir_fd``) now, or None
    when it cannot be read; a folder on another mount than ``dir_fd``'s (a mount point
    itself) or holding one names it in ``mounts``."""
    try:
        return tree_summary(os.fsdecode(name), dir_fd=dir_fd, within=mount_key(dir_fd))
    except OSError:
        return None


def seen_tree_unchanged(seen: str | None, now: TreeSummary | None) -> bool:
    """True when the folder about to be claimed, summarised ``now``, is still the tree it
    settled as (the same folder, and nothing inside written, added, removed or renamed
    since), or when the scan recorded no tree (items of an older journal). False when
    it could not be read whole (``now`` None)."""
    want = _recorded(seen) if seen is not None else {}
    tree = want.get("tree")
    if tree is None:
        return True
    if now is None:
        return False
    ident = now.identity
    return (want.get("dev"), want.get("ino")) == (ident.dev, ident.ino) and all(
        tree.get(k) == getattr(ident, k) for k in TREE_FIELDS
    )


def _agrees(want: Mapping[str, Any], st: os.stat_result, fields: tuple[str, ...]) -> bool:
    """True when every recorded field (device, inode, size, times) is ``st``'s."""
    return all(want.get(f) == getattr(st, "st_" + f) for f in fields)


def fstat_matches(recorded: str | None, st: os.stat_result) -> bool:
    if recorded is None:
        return False
    return _agrees(_recorded(recorded), st, ("dev", "ino", "size", "mtime_ns", "ctime_ns"))


def paired(seen: str | None) -> bool:
    """True when the scan that journaled the item looked for its sidecars (a manual
    deposit's files, and items of an older journal, were never paired with one)."""
    return seen is not None and bool(_recorded(seen).get("paired"))


def sidecar_seen_matches(
    seen: str | None, st: os.stat_result | None, *, moved: bool = False
) -> bool:
    """True when the sidecar about to be taken (``st``, None: nothing there) is the one
    the scan saw settle (device, inode, size, modification and change times; ``moved``:
    already in the work folder, where the move changed its change time: device, inode,
    size and modification time), or when none was recorded (items of an older
    journal: taken as found)."""
    want = _recorded(seen).get("sidecar") if seen is not None else None
    if want is None:
        return True
    if st is None:
        return False
    fields = ("dev", "ino", "size", "mtime_ns") + (() if moved else ("ctime_ns",))
    return _agrees(want, st, fields)
