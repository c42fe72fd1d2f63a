"""Moving a claimed input to the rejected folder (with its reason), or back to the inbox.

Both moves stay on the inbox's filesystem and never overwrite: files move with
``link()`` + ``unlink()``, folders with ``renameat2(RENAME_NOREPLACE)``. The
chosen destination is journaled before anything is written, so replaying the
step after a crash finishes the same move instead of starting another.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import structlog

from nbankd import seams
from nbankd.archive import fsops
from nbankd.deposit.identity import marker_is_claimed, stat_fields
from nbankd.deposit.inboxfs import Escape, InboxFS
from nbankd.deposit.journal import Item
from nbankd.deposit.spec import InboxSpec
from nbankd.names import MARKER_SUFFIX, REASON_SUFFIX, SIDECAR_SUFFIXES, printable
from nbankd.shellwords import requeue_command
from nbankd.timefmt import iso

log = structlog.get_logger("nbankd.deposit")

NAME_MAX = 255


def reason_name(basename: bytes) -> bytes:
    """``NAME.reason``, with NAME shortened when the whole would not fit in 255 bytes."""
    suffix = REASON_SUFFIX.encode()
    if len(basename) + len(suffix) <= NAME_MAX:
        return basename + suffix
    keep = NAME_MAX - len(suffix) - 9
    digest = hashlib.sha1(basename).hexdigest()[:8]
    head = basename[:keep]
    try:
        basename.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        head = head.decode("utf-8", "ignore").encode()  # never split a character
    return head + b"~" + digest.encode() + suffix


def _is_temporary_name(name: bytes) -> bool:
    """True for names of the form :func:`_write_reason` uses for its temporary files
    (``.NAME.reason.tmp``, possibly shortened), which a later rejection may remove."""
    return name.startswith(b".") and name.endswith(b".tmp")


def _candidates(basename: bytes, room: int = NAME_MAX) -> Iterator[bytes]:
    """``basename`` (when it fits in ``room`` bytes), then ``stem~1.ext``,
    ``stem~2.ext``, ...: each at most ``room`` bytes, the stem shortened from its end
    (never a UTF-8 character split), or, when the extension leaves no room for a stem,
    the whole name shortened before the ``~N``. Every one differs from the others,
    and none starts with a dot unless ``basename`` does (a dotfile is hidden from
    the scan by the default ignore pattern)."""
    stem, dot, ext = basename.rpartition(b".") if b"." in basename[1:] else (basename, b"", b"")
    if _is_temporary_name(basename):
        stem, dot, ext = basename, b"", b""  # NAME~N: no longer ends in .tmp
    if len(basename) <= room:
        yield basename
    for n in itertools.count(1):
        tag = b"~%d" % n
        tail = tag + dot + ext
        if len(tail) < room:
            yield _shortened(stem, room - len(tail)) + tail
        else:
            yield _shortened(basename, room - len(tag)) + tag


def _shortened(name: bytes, size: int) -> bytes:
    """The first ``size`` bytes of ``name``, fewer if that would split a character of
    a UTF-8 name."""
    if len(name) <= size:
        return name
    head = name[: max(0, size)]
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return head
    return head.decode("utf-8", "ignore").encode()


def _free_name(folder: Path, basename: bytes, sidecar_suffix: bytes = b"") -> bytes:
    """``basename``, or ``stem~N.ext`` for the first N that names nothing in ``folder``
    and is not of the form of a temporary reason file (an input called so would be
    removed by the next rejection's clean-up), and whose sidecar and marker names
    name nothing either: a sidecar or marker left there by an earlier input (its input
    deleted by a person) would otherwise be taken for this one's and go back with it
    at a requeue. With ``sidecar_suffix``, the name leaves room for that suffix."""

    def taken(name: bytes) -> bool:
        return os.path.lexists(folder / os.fsdecode(name))

    for candidate in _candidates(basename, NAME_MAX - len(sidecar_suffix)):
        if not (
            _is_temporary_name(candidate)
            or taken(candidate)
            or taken(reason_name(candidate))
            or any(taken(candidate + companion) for companion in _COMPANIONS)
        ):
            return candidate
    raise AssertionError("unreachable: the candidates never end")


#: what may sit beside a rejected input under its name: its sidecars and marker
_COMPANIONS = tuple(os.fsencode(x) for x in (*SIDECAR_SUFFIXES, MARKER_SUFFIX))

#: names tried, looking for where an input was put back before a crash
_FIND_LIMIT = 1000


def _put_back_where(fs: InboxFS, item: Item, suffix: bytes) -> tuple[int, bytes] | None:
    """Where an earlier run of :func:`put_back` returned ``item``'s input (the names it
    chose among leaving room for ``suffix``): the first of its name's candidates, in
    its folder or else at the inbox's top (where a folder swapped for a link sends
    it), holding the claimed entry (dev and inode of the identity journaled at
    claim); None when not found (or no identity)."""
    if item.identity is None:
        return None
    want = json.loads(item.identity)
    places: list[tuple[int, bytes]] = []
    with contextlib.suppress(Escape, NotADirectoryError, FileNotFoundError):
        places.append(fs.parent(item.relpath))
    places.append((fs.root, os.path.basename(item.relpath)))
    for parent, name in places:
        for candidate in itertools.islice(_candidates(name, NAME_MAX - len(suffix)), _FIND_LIMIT):
            st = fs.lstat(parent, candidate)
            if st is not None and (st.st_dev, st.st_ino) == (want.get("dev"), want.get("ino")):
                return parent, candidate
    return None


def _move_no_replace(fs: InboxFS, src: tuple[int, bytes], dst: tuple[int, bytes]) -> None:
    """Moves an entry between open folders without ever replacing something there."""
    if fs.exists(*dst) and not fs.exists(*src):
        return  # done by an earlier attempt
    fs.move(src[0], src[1], dst[0], dst[1])


def _is_reason_for(folder: int, name: bytes, dest: Path) -> bool:
    """True if ``name`` in ``folder`` is a reason nbankd wrote for an input rejected to
    ``dest``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):  # not ours: a planted file, nested JSON
        return False
    return isinstance(data, dict) and data.get("rejected_path") == str(dest)


def _write_reason(folder: int, name: bytes, data: bytes, dest: Path) -> bool:
    """Writes ``name`` in the open ``folder`` whole, replacing only an earlier
    attempt's reason for ``dest``.

    Returns False, writing nothing, when something else holds the name (another
    input rejected at the same moment may be called ``NAME.reason``): replacing
    it would destroy that input.
    """
    # the temporary name depends only on ``name``: a replay after a crash removes the
    # one a killed attempt left (never truncating it: it may already be ``name`` too)
    tmp = b"." + name[:200] + b".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=folder)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=folder)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=folder)
        raise
    os.close(fd)
    seams.reached("after-reason-temp")
    try:
        os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        if not _is_reason_for(folder, name, dest):
            os.unlink(tmp, dir_fd=folder)
            return False
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)  # our own earlier reason
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=folder)
    fsops.fsync_fd(folder)
    return True


def _reason_text(reason: dict[str, object]) -> bytes:
    try:
        return (json.dumps(reason, indent=2, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a name with undecodable bytes: \udcXX escapes keep them exact
        return (json.dumps(reason, indent=2) + "\n").encode()


_REJECT_LOCK = threading.Lock()  # one rejection at a time chooses names in this process


def move_to_rejected(
    spec: InboxSpec,
    item: Item,
    *,
    fs: InboxFS,
    now: float,
    save: Callable[[Item], Item],
) -> Item:
    """Writes ``NAME.reason`` then moves the input (and sidecar, marker) to rejected_dir.

    Neither the reason nor the input ever replaces anything: if another input takes
    the chosen name (or its ``.reason`` name) first, a new name is chosen. Every
    folder is reached through ``fs`` (never through a link).
    """
    rel = item.relpath
    sub = os.path.dirname(rel)
    token = item.token.encode()
    sidecar = sidecar_work_name(item)
    suffix = _sidecar_suffix(item)
    # a name whose sidecar's name is free and fits too, when a sidecar goes along
    pair = suffix if suffix and sidecar is not None and fs.exists(fs.work, sidecar) else b""
    shown = spec.rejected_dir / os.fsdecode(sub)  # where the user finds them
    try:
        folder_fd = fs.folder(fs.rejected, sub, create=True, where=str(shown))
    except (Escape, NotADirectoryError):
        # a link or a file where the sub-folder belongs: the rejected folder's top
        # takes the input instead, under a free name; nothing goes through the link
        sub, shown, folder_fd = b"", spec.rejected_dir, fs.rejected
        if item.rejected_relpath is not None and os.path.dirname(item.rejected_relpath):
            item = save(replace(item, rejected_relpath=None))
    folder = fs.at(folder_fd)  # where names are tried, through the open folder
    with _REJECT_LOCK:
        while True:
            if item.rejected_relpath is None:
                chosen = _free_name(folder, os.path.basename(rel), pair)
                item = save(replace(item, rejected_relpath=os.path.join(sub, chosen)))
                seams.reached("after-reject-name")
            assert item.rejected_relpath is not None
            dest_name = os.path.basename(item.rejected_relpath)
            dest = shown / os.fsdecode(dest_name)
            reason = json.loads(item.reason_json or "{}")
            reason.update(
                {
                    "code": reason.get("code") or item.error_code or "rejected",
                    "message": reason.get("message") or item.error_message or "",
                    "hint": reason.get("hint") or "",
                    "time": iso(now),
                    "sha1": item.sha1,
                    "original_path": str(spec.path / item.relpath_str),
                    "original_name": os.fsdecode(os.path.basename(rel)),
                    "rejected_path": str(dest),
                    "identifier": item.name,
                    "requeue": requeue_command(dest, spec.config_source),
                }
            )
            reason_file = reason_name(dest_name)
            if not _write_reason(folder_fd, reason_file, _reason_text(reason), dest):
                item = save(replace(item, rejected_relpath=None))  # name taken: choose again
                continue
            seams.reached("after-reject-reason")
            if fs.exists(fs.work, token):
                try:
                    _move_no_replace(fs, (fs.work, token), (folder_fd, dest_name))
                except FileExistsError:  # taken since it was chosen: withdraw, choose again
                    os.unlink(reason_file, dir_fd=folder_fd)
                    item = save(replace(item, rejected_relpath=None))
                    continue
            break
    if sidecar is not None and fs.exists(fs.work, sidecar) and item.sidecar_relpath:
        side_dest = dest_name + suffix if suffix else os.path.basename(item.sidecar_relpath)
        if not fs.exists(folder_fd, side_dest):
            _move_no_replace(fs, (fs.work, sidecar), (folder_fd, side_dest))
    if item.marker_relpath is not None:
        with contextlib.suppress(Escape, FileNotFoundError, NotADirectoryError):
            marker = fs.parent(item.marker_relpath)  # its folder may be gone: nothing to move
            found = fs.lstat(*marker)
            # one set again since the claim marks the next recording of the name: left
            if (
                found is not None
                and marker_is_claimed(item.identity, stat_fields(found))
                and not fs.exists(folder_fd, dest_name + MARKER_SUFFIX.encode())
            ):
                _move_no_replace(fs, marker, (folder_fd, dest_name + MARKER_SUFFIX.encode()))
    seams.reached("after-reject-move")
    return replace(item, reason_json=json.dumps(reason))


def put_back(spec: InboxSpec, item: Item, *, fs: InboxFS) -> tuple[int, bytes] | None:
    """Returns a claimed input to its place in the inbox (it changed: still being
    written), under a free name if its own (or its sidecar's) was taken meanwhile.
    Its sidecar follows the name the input gets, and is never put where it would be
    another input's metadata or an input of its own (a name that is no sidecar's):
    should its name be taken after the input moved, the input moves on to the next
    free pair of names; should the input not be found (run again after a crash, by a
    row journaled without identity), the sidecar stays in the work folder (logged).
    The input moves first; run again after a crash between the moves, it is found
    where it went by the identity journaled at claim. Returns where the input is now
    (its folder's descriptor and its name; None when it cannot be told)."""
    token = item.token.encode()
    sidecar = sidecar_work_name(item)
    suffix = _sidecar_suffix(item)
    side_waits = sidecar is not None and fs.exists(fs.work, sidecar)
    pair = suffix if side_waits and suffix else b""
    placed: tuple[int, bytes] | None = None
    if fs.exists(fs.work, token):
        try:
            parent, name = fs.parent(item.relpath, create=True)
        except (Escape, NotADirectoryError):
            # a link or a file where its folder was: back at the inbox's top instead
            parent, name = fs.root, os.path.basename(item.relpath)
        if fs.exists(parent, name) or (pair and fs.exists(parent, name + pair)):
            name = _free_name(fs.at(parent), name, pair)
        _move_no_replace(fs, (fs.work, token), (parent, name))
        seams.reached("after-put-back")
        placed = (parent, name)
    elif pair:
        placed = _put_back_where(fs, item, pair)
    if sidecar is None or not side_waits or item.sidecar_relpath is None:
        return placed
    if not pair:  # not named after its input (an older row): its own name, if free
        try:
            side = fs.parent(item.sidecar_relpath, create=True)
        except (Escape, NotADirectoryError):
            side = (fs.root, os.path.basename(item.sidecar_relpath))
        if fs.exists(*side):
            _sidecar_kept(item, "its own name is taken")
            return placed
        _move_no_replace(fs, (fs.work, sidecar), side)
        return placed
    if placed is None:
        _sidecar_kept(item, "where the input went cannot be told")
        return None
    parent, name = placed
    while fs.exists(parent, name + pair):  # taken since the input moved: move on
        moved = _free_name(fs.at(parent), os.path.basename(item.relpath), pair)
        _move_no_replace(fs, (parent, name), (parent, moved))
        name = moved
    _move_no_replace(fs, (fs.work, sidecar), (parent, name + pair))
    return parent, name


def _sidecar_kept(item: Item, why: str) -> None:
    log.warning(
        "an input put back into its inbox left its sidecar in the work folder: " + why,
        item=item.token,
        sidecar=printable(os.fsdecode(item.sidecar_relpath or b"")),
    )


def _sidecar_suffix(item: Item) -> bytes | None:
    """What the sidecar's name adds to the input's (``.nbank.yaml``); None without a
    sidecar, or one not named after its input in the same folder."""
    side, rel = item.sidecar_relpath, item.relpath
    if side is None or not side.startswith(rel) or len(side) == len(rel):
        return None
    suffix = side[len(rel) :]
    return None if b"/" in suffix else suffix


def sidecar_work_name(item: Item) -> bytes | None:
    """The name an input's sidecar takes in the work folder: ``<token>.sidecar.yaml``
    or ``.json`` (what :mod:`nbankd.daemon.orphans` recognises as owned)."""
    if item.sidecar_relpath is None:
        return None
    suffix = b".json" if item.sidecar_relpath.endswith(b".json") else b".yaml"
    return item.token.encode() + b".sidecar" + suffix
