"""Inboxes named through symbolic links: followed only when no other user could
have made or could swap any link on the way (the daemon at start and reload, and
``nbankd check-config``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nbankd import errors

#: links followed on an inbox's path before giving up (the kernel's own limit)
MAX_LINKS = 40


def inbox_link_problem(path: Path) -> None:
    """Raises ConfigError when the inbox's path goes through a symbolic link others
    could have put there or could swap: one not owned by root or this user, or in a
    folder a user other than those may rename entries of (writable by its group or
    others without the sticky bit, or owned by someone else). Every link met while
    following the path is judged, not only its last component: a writer of any folder
    on the way could otherwise swap a folder below it for a link to another folder
    before a restart and have the daemon claim what is in it. Real folders are fine
    (a swap of the inbox while nbankd runs is refused there)."""
    pending = list(Path(os.path.abspath(os.fspath(path))).parts[1:])
    current = "/"
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        here = os.path.join(current, part)
        try:
            st = os.lstat(here)
        except OSError:
            return  # absent from here on: made below, as folders
        if not stat.S_ISLNK(st.st_mode):
            current = here
            continue
        _judge_link(path, Path(here), st, current)
        hops += 1
        if hops > MAX_LINKS:
            raise errors.ConfigError(
                f"inbox {path}: more than {MAX_LINKS} symbolic links on the way to it",
                hint="name the folder itself as the inbox",
            )
        try:
            target = os.readlink(here)
        except OSError:
            return
        if target.startswith("/"):
            current = "/"
        pending[:0] = Path(target).parts[1:] if target.startswith("/") else Path(target).parts


def _judge_link(inbox: Path, link: Path, st: os.stat_result, folder: str) -> None:
    """Raises ConfigError unless the link ``link`` (``st``), in ``folder``, could only
    have been made and can only be swapped by root or this user."""
    try:
        parent = os.stat(folder)
    except OSError:
        return
    ours = (0, os.geteuid())
    loose = parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX
    if st.st_uid not in ours:
        why = f"the link belongs to uid {st.st_uid}"
    elif parent.st_uid not in ours:
        why = f"{folder} belongs to uid {parent.st_uid}"
    elif loose:
        why = f"{folder} is writable by others (mode {stat.S_IMODE(parent.st_mode):04o})"
    else:
        return
    what = (
        f"inbox {inbox} is a symbolic link"
        if link == Path(os.path.abspath(os.fspath(inbox)))
        else f"inbox {inbox} is reached through {link}, a symbolic link"
    )
    raise errors.ConfigError(
        f"{what} another user may have made or may replace: {why}",
        hint=f"name the folder it leads to ({os.path.realpath(inbox)}) as the inbox, "
        "or keep the link in a folder only root may change",
    )
