"""Reading the configuration file itself: a regular file of bounded size, never a
FIFO or a device (which would hang or never end), and a warning when users other
than its owner may rewrite it (whoever edits it chooses where recordings go and
where the registry credentials are sent).

A configuration given through a symbolic link is normal (``/etc/nbankd/config.yaml``
managed elsewhere): the link is followed, but what it names must be a regular file.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from nbankd.config.model import CONFIG_ENV, Problem
from nbankd.smallfile import SmallFileError, read_regular

__all__ = ["CONFIG_MAX_BYTES", "read_config_file", "writable_by_others"]

#: a configuration is a few kilobytes; this is far above any real one
CONFIG_MAX_BYTES = 1 << 20
_OTHER_FILE = f"give the configuration file (a regular file) with -c FILE or ${CONFIG_ENV}"


def read_config_file(source: Path) -> tuple[bytes | None, list[Problem]]:
    """The file's bytes, or None and the problem; a warning may come with the bytes."""
    try:
        raw, st = read_regular(source, CONFIG_MAX_BYTES)
    except SmallFileError as err:
        if err.reason == "not-regular":
            message = f"is {err.noun}, not a regular file"
        elif err.reason == "too-large":
            message = (
                f"is larger than {CONFIG_MAX_BYTES // (1 << 20)} MiB; a configuration "
                "file is a few kilobytes"
            )
        else:
            message = f"cannot read the configuration file: {err.strerror}"
        return None, [Problem(source, "", message, hint=_OTHER_FILE)]
    warning = writable_by_others(source, st)
    return raw, [warning] if warning is not None else []


def writable_by_others(source: Path, st: os.stat_result) -> Problem | None:
    """A warning when others may rewrite the file: any user (o+w), or a group other
    than root's or its owner's own (a group named as the owner, as user-private
    groups are)."""
    mode = stat.S_IMODE(st.st_mode)
    who = ""
    if mode & stat.S_IWOTH:
        who = "every user of this host"
    elif mode & stat.S_IWGRP and st.st_gid != 0 and _group_name(st.st_gid) != _user_name(st.st_uid):
        who = f"group {_group_name(st.st_gid) or st.st_gid}"
    if not who:
        return None
    return Problem(
        source,
        "",
        f"is writable by {who} (mode {mode:04o}): whoever edits it chooses where "
        "recordings go and where the registry credentials are sent",
        severity="warning",
        hint=f"run: chmod go-w {source}",
    )


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
