"""Manual deposits handed to the running daemon (``nbankctl deposit`` with its
configuration): ``deposit`` journals and starts them, ``deposit-status`` reports on
them, waiting a little for them to end. Admins only (see protocol.ADMIN_COMMANDS).

The daemon's own user claims the files (a rename into a work folder beside them), so
their folder must be one it can write; the files go through the same steps as an
inbox's, and a refused file is put back where it was.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbankd import errors
from nbankd.control.protocol import ProtocolError, string_arg
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
    metadata = args.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ProtocolError("usage", "'metadata' must be an object")
    mode = args.get("file_metadata", "read")
    if mode not in _FILE_METADATA:
        raise ProtocolError("usage", f"'file_metadata' must be one of {', '.join(_FILE_METADATA)}")
    by_folder: dict[Path, list[str]] = {}
    refused: list[dict[str, str]] = []
    config = daemon.config
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
        if why is not None:  # the control socket is where such a request arrives
            refused.append({"source": f, "error": why})
            continue
        by_folder.setdefault(path.parent, []).append(path.name)
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
            new, no = daemon.submit_manual(inbox, names)
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
    wait = args.get("wait", 0)
    if not isinstance(wait, (int, float)):
        raise ProtocolError("usage", "'wait' must be a number of seconds")
    deadline = time.monotonic() + min(max(float(wait), 0.0), STATUS_WAIT)
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
