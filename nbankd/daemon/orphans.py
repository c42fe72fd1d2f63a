"""Work files no deposit of this daemon owns: what a lost or restored ``state_dir``
leaves in ``<inbox>/.nbank/`` (or a second daemon working in the same inbox).

A claim journals its item (durably) before it renames the input into ``.nbank/``,
so every work file of this daemon is named after a token its journal knows:
``<token>``, ``<token>.sidecar.yaml|json`` and ``<token>.released`` (a folder being
removed once deposited). Anything else there is reported in
``nbankctl status`` (degraded): nothing would ever deposit it, and the user's
bytes sit in a hidden folder. It is never moved or deleted by the daemon. NFS
``.nfs*`` placeholders (a removed file still open somewhere) are not reported.
The folder is read outside the daemon's lock (a hung filesystem must not stall
deposits); a folder that cannot be read is reported as such, and one replaced by a
symbolic link as a link (never followed: what it points to is not listed).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterable, Set
from pathlib import Path

from nbankd import errors
from nbankd.deposit import folderproof
from nbankd.names import PROBE_PREFIX

_WORK_NAME = re.compile(r"^([0-9a-f]{32})(?:\.sidecar\.(?:yaml|json)|\.released)?$")


def token_of(name: str) -> str | None:
    """The item token a work file is named after, or None for any other name."""
    match = _WORK_NAME.match(name)
    return match.group(1) if match else None


def unowned(names: Iterable[str], known: Set[str]) -> list[str]:
    """The names (sorted) whose token is not in ``known``, or that no token names,
    leaving out NFS placeholders, the daemon's token (:mod:`nbankd.deposit.folderproof`)
    and the probes made there for a moment (:func:`nbankd.deposit.manual.calibrate`,
    :func:`nbankd.daemon.setup.check_placement`)."""
    return sorted(
        n
        for n in names
        if token_of(n) not in known
        and not n.startswith(".nfs")
        and n != folderproof.PROOF_NAME
        and not n.startswith(folderproof.TEMP_NAME)
        and not n.startswith(PROBE_PREFIX)
    )


class WorkFolderIsLink(Exception):
    """The work folder is a symbolic link (swapped by someone who can write the inbox):
    what it points to is never listed, never taken for claimed inputs."""

    def __init__(self, work_dir: Path) -> None:
        super().__init__(f"{work_dir} is a link")
        self.work_dir = work_dir


def unowned_work_files(
    work_dir: Path, known_tokens: Callable[[Iterable[str]], Set[str]]
) -> list[str]:
    """Names in ``work_dir`` that no item of the journal owns (``known_tokens`` answers
    which of the given tokens the journal has). A missing folder holds nothing; a
    symbolic link there is never followed (:class:`WorkFolderIsLink`)."""
    try:
        fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(work_dir):
            raise WorkFolderIsLink(work_dir) from err
        if err.errno == errno.ENOTDIR:
            return []
        raise
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
    finally:
        os.close(fd)
    tokens = {t for t in map(token_of, names) if t is not None}
    return unowned(names, known_tokens(tokens) if tokens else set())


def check(
    work_dir: Path, known_tokens: Callable[[Iterable[str]], Set[str]]
) -> tuple[list[str], str | None]:
    """(unowned names, the degraded line for status or None) for one inbox."""
    try:
        names = unowned_work_files(work_dir, known_tokens)
    except WorkFolderIsLink:
        return [], (
            f"{work_dir} is a link, not the inbox's work folder: not followed, so what it "
            "points to is never listed as claimed inputs (move the link aside and restart "
            "nbankd, which makes a new work folder)"
        )
    except OSError as err:
        problem = errors.process_limit_problem(err, f"listing {work_dir}")
        if problem is not None:
            return [], problem
        return [], f"cannot list {work_dir}: {err.strerror or err}; check its owner and mode"
    if not names:
        return [], None
    return names, (
        f"{len(names)} file(s) in {work_dir} that no deposit of this daemon owns: "
        "inputs claimed by a daemon whose state_dir was lost or restored (to deposit "
        "one, move it back into the inbox under its original name, and a "
        "<name>.sidecar.yaml beside it as <original name>.nbank.yaml), or another "
        "daemon works in this inbox (stop one of them); nbankd leaves them alone"
    )


__all__ = ["WorkFolderIsLink", "check", "token_of", "unowned", "unowned_work_files"]
