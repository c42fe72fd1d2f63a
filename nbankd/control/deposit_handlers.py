"""Manual deposits handed to the running daemon (``nbankctl deposit`` with its
configuration): ``deposit`` journals and starts them, ``deposit-status`` reports on
them, waiting a little for them to end. Admins only (see protocol.ADMIN_COMMANDS).

The daemon's own user claims the files (a rename into a work folder beside them), so
their folder must be one it can write; the files go through the same steps as an
inbox's, and a refused file is put back where it was.

The daemon may read and move more than the admin who asks (it runs as root or as the
archives' user), so it takes only what that admin could take themselves
(:class:`~nbankd.control.peer_rights.PeerRights`, on the peer credentials the control
server gives): each file readable by them (a folder: every file in it, every folder
in it searchable), on a path they may search, out of a folder they may write. Other
files are refused, named, and left where they are. Root and the daemon's own user are
not checked.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbankd import errors, seams
from nbankd.archive.fsops import DIR_NOFOLLOW
from nbankd.control.peer_rights import READ, SEARCH, WRITE, PeerRights, peer_of
from nbankd.control.protocol import ProtocolError, no_nul, string_arg, wait_arg
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import State

if TYPE_CHECKING:
    from nbankd.config.model import ArchiveConfig
    from nbankd.daemon.view import DaemonView as Daemon
    from nbankd.deposit.journal import Item

#: the longest one deposit-status request waits for its items (nbankctl polls)
STATUS_WAIT = 30.0
_FILE_METADATA = ("read", "skip", "override")


def configured_archive(daemon: Daemon, args: dict[str, Any]) -> ArchiveConfig:
    """The configured archive whose path is the request's ``archive`` (what
    ``deposit``, ``copy`` and ``tape-import`` write into); ProtocolError naming the
    daemon's archives otherwise."""
    path = Path(str(string_arg(args, "archive", required=True)))
    archive = next((a for a in daemon.config.archives if a.path == path), None)
    if archive is None:
        raise ProtocolError(
            "not-found",
            f"archive {path} is not one of this daemon's archives "
            f"({', '.join(str(a.path) for a in daemon.config.archives) or 'none'})",
        )
    return archive


def deposit(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Journals the files (absolute paths, ``files``) for the configured archive at
    ``archive`` and starts them; returns the items' ids (``items``)."""
    archive = configured_archive(daemon, args)
    files = args.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ProtocolError("usage", "'files' must be a list of paths")
    for f in files:
        no_nul("files", f)
    held = daemon.archive_held(archive.name, archive.path)
    if held is not None:  # as an inbox's inputs wait: nothing journaled, nothing moved
        return {"items": [], "refused": [{"source": f, "error": held} for f in files]}
    metadata = args.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ProtocolError("usage", "'metadata' must be an object")
    mode = args.get("file_metadata", "read")
    if mode not in _FILE_METADATA:
        raise ProtocolError("usage", f"'file_metadata' must be one of {', '.join(_FILE_METADATA)}")
    by_folder: dict[Path, list[str]] = {}
    refused: list[dict[str, str]] = []
    config = daemon.config
    rights = PeerRights(peer_of(args))
    # what the peer was checked for, by (device, inode): journaled only if still there
    expected: dict[tuple[Path, str], tuple[int, int]] = {}
    for f in files:
        path = Path(f)
        if not path.is_absolute() or path.name in ("", ".", ".."):
            raise ProtocolError("usage", f"{f!r} is not an absolute path to a file")
        why = manual.place_refusal(
            path,
            archives=[a.path for a in config.archives],
            state_dirs=[config.state_dir],
            inboxes=[i.path for i in config.inboxes],
        )
        checked: tuple[int, int] | None = None
        if why is None:
            why, checked = _peer_refusal(rights, path)
        if why is not None:  # the control socket is where such a request arrives
            refused.append({"source": f, "error": why})
            continue
        by_folder.setdefault(path.parent, []).append(path.name)
        if checked is not None:
            expected[path.parent, path.name] = checked
    seams.reached("handover-checked")
    ids: list[int] = []
    for folder, names in by_folder.items():
        inbox = manual.ManualInbox(
            folder=folder,
            archive=archive.name,
            archive_path=archive.path,
            registry=daemon.registry.url,
            dtype=string_arg(args, "dtype"),
            metadata=metadata,
            auto_id=True if args.get("auto_id") else None,
            zip_directories=bool(args.get("zip_directories")),
            file_metadata=mode,
        )
        try:
            checked = {n: expected[folder, n] for n in names if (folder, n) in expected}
            new, no = daemon.submit_manual(inbox, names, checked)
        except (errors.NbankdError, OSError) as err:
            user = pwd.getpwuid(os.geteuid()).pw_name
            why = (
                f"nbankd runs as {user!r}, which cannot write in {folder} to claim files "
                f"({getattr(err, 'message', None) or err})"
            )
            refused += [
                {
                    "source": str(folder / n),
                    "error": why
                    + "; let nbankd's group write the folder (group-writable, setgid), or "
                    "run the deposit without the daemon as the archive's user",
                }
                for n in names
            ]
            continue
        ids += new
        refused += [{"source": str(folder / n), "error": why} for n, why in no]
    return {"items": ids, "refused": refused}


def deposit_status(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """How the items ``items`` (ids from ``deposit``) stand; waits up to ``wait``
    seconds (at most :data:`STATUS_WAIT`) for all of them to end."""
    ids = args.get("items")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ProtocolError("usage", "'items' must be a list of item ids")
    deadline = time.monotonic() + wait_arg(args, "wait", STATUS_WAIT)
    while True:
        items = [daemon.journal.get(i) for i in ids]
        missing = [i for i, item in zip(ids, items, strict=True) if item is None]
        if missing:
            raise ProtocolError("not-found", f"no deposit item {missing[0]}")
        done = all(manual.is_final(item) for item in items if item is not None)
        if done or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # the journal is the truth; a short poll costs nothing here
    return {"done": done, "items": [_described(item) for item in items if item is not None]}


_DIR_FLAGS = DIR_NOFOLLOW


class _Refusal(Exception):
    """Why the peer could not take a file itself (the message)."""


def _peer_refusal(rights: PeerRights, path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """Why the peer of ``rights`` could not hand over ``path`` by themselves, naming it
    and what to do (None when they could), and the (device, inode) of the entry they
    were checked for (None when not checked: root, the daemon's user). Its folder is the
    one ``path``'s folder resolves to (nbankctl sends paths as given, links and all), as
    the peer's own open would resolve it; from there nothing is followed."""
    if not rights.checked:
        return None, None
    who = rights.who
    checked = None
    try:
        why, checked = _cannot_take(rights, Path(os.path.realpath(path.parent)), path.name)
    except _Refusal as err:
        why = str(err)
    except FileNotFoundError:
        why = "it does not exist"
    except (OSError, ValueError) as err:
        why = f"nbankd cannot check it ({getattr(err, 'strerror', None) or err})"
    if why is None:
        return None, checked
    return (
        f"nbankd will not take {path} for {who}: {why}; nbankd hands over only what the "
        f"admin asking could read and move themselves: ask the file's owner to deposit "
        f"it, or to let {who} read it and write its folder"
    ), None


def _cannot_take(
    rights: PeerRights, folder: Path, name: str
) -> tuple[str | None, tuple[int, int] | None]:
    """Why the peer could not move ``name`` out of ``folder`` (a path without links)
    and read it (a folder: all of it), or None; and the entry's (device, inode)."""
    who = rights.who
    fd = rights.walk(folder, _Refusal)
    try:
        try:
            entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return "it does not exist", None
        checked = (entry.st_dev, entry.st_ino)
        if not rights.may_move(fd, entry):
            return f"{who} may not move files out of the folder {folder}", checked
        if stat.S_ISREG(entry.st_mode):
            return _unreadable(rights, fd, name, folder / name), checked
        if stat.S_ISDIR(entry.st_mode):
            return _tree_unreadable(rights, fd, name, folder / name), checked
        # a link, a device...: the deposit refuses its kind, never follows it
        return None, checked
    finally:
        os.close(fd)


def _unreadable(rights: PeerRights, folder: int, name: str, shown: Path) -> str | None:
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"{shown} changed while nbankd checked it; hand it over again"
        return None if rights.allows(fd, READ) else f"{rights.who} may not read {shown}"
    finally:
        os.close(fd)


def _tree_unreadable(rights: PeerRights, parent: int, name: str, top: Path) -> str | None:
    """Why the peer could not move the folder ``name`` (write on it: its ``..``
    changes) or read all of it: every folder listable and searchable, every file
    readable. Links and special files are not followed (the deposit refuses them).
    One descriptor is open per level of folders, never one per folder."""
    who = rights.who
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            return f"{top} changed while nbankd checked it; hand it over again"
        raise
    try:
        if not rights.allows(fd, WRITE):
            return f"{who} may not write the folder {top} (moving a folder changes its '..')"
    except BaseException:
        os.close(fd)
        raise
    stack: list[tuple[int, Path, list[str]]] = []  # open folders, their paths, folders left

    def enter(fd: int, shown: Path) -> str | None:
        """Checks the folder open at ``fd`` and its files; keeps it to visit its folders."""
        try:
            if not rights.allows(fd, READ | SEARCH):
                os.close(fd)
                return f"{who} may not list or enter the folder {shown}"
            folders = []
            with os.scandir(fd) as entries:
                names = [
                    (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                    for e in entries
                ]
            for entry, is_dir, is_file in names:
                if is_dir:
                    folders.append(entry)
                if not is_file:
                    continue  # a folder (visited next), or what the deposit refuses
                try:
                    why = _unreadable(rights, fd, entry, shown / entry)
                except FileNotFoundError:
                    continue  # gone since it was listed
                if why is not None:
                    os.close(fd)
                    return why
        except BaseException:
            os.close(fd)
            raise
        stack.append((fd, shown, folders))
        return None

    try:
        why = enter(fd, top)
        while why is None and stack:
            fd, shown, folders = stack[-1]
            if not folders:
                stack.pop()
                os.close(fd)
                continue
            sub = folders.pop()
            try:
                child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue  # gone since it was listed
            except OSError as err:
                if err.errno in (errno.ENOTDIR, errno.ELOOP):
                    return f"{shown / sub} changed while nbankd checked it; hand it over again"
                raise
            why = enter(child, shown / sub)
        return why
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _described(item: Item) -> dict[str, Any]:
    """:func:`manual.describe` with where a refused input is now: handed back here if its
    worker has not yet (idempotent: the same hand-back), or still held, its place taken."""
    rejected = (
        item.state is State.REJECTED
        and item.rejected_relpath is not None
        and manual.ManualInbox.from_key(item.inbox) is not None
    )
    where = manual.return_rejected(item) if rejected else None
    return manual.describe(item, where)


__all__ = ["deposit", "deposit_status"]
