"""Folders that must not overlap: archives, inboxes, the state directory, and the
files the daemon reads or writes (control socket, credentials, metrics textfile).

An inbox inside an archive would take stored files back out of it; an inbox inside
the state directory would deposit the daemon's own journal and receipts; a
credentials file inside an inbox would be deposited. Paths are compared as written
*and* as the filesystem has them: symbolic links resolved (``os.path.realpath``) and,
for folders that exist, by device and inode, so a link (``inbox2 -> archive/resources``)
or a bind mount cannot hide an overlap. This is the one place parsing looks at the
filesystem; it only reads (``stat``), and only when asked (the daemon and
check-config: a hung network mount would hang any other command reading the
configuration). A path that does not exist yet is compared through its nearest
existing parent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbankd.config.model import AlertsConfig, ArchiveConfig, InboxConfig, MetricsConfig
from nbankd.config.parsing import ParserBase
from nbankd.config.values import KeyPath, within

__all__ = ["OverlapChecks", "Place", "daemon_files", "inside"]

Identity = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class Place:
    """A configured path, as written and as the filesystem has it."""

    path: Path  # as configured (absolute, normalised)
    real: Path  # symbolic links resolved
    identity: Identity | None  # of the folder itself, when it exists
    chain: frozenset[Identity]  # of the folder and every existing parent

    @classmethod
    def written(cls, path: Path) -> Place:
        """The path as written only (nothing looked up)."""
        return cls(path, path, None, frozenset())

    @classmethod
    def of(cls, path: Path) -> Place:
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            real = path
        chain: set[Identity] = set()
        identity: Identity | None = None
        for candidate in (real, *real.parents):
            try:
                st = os.stat(candidate)
            except (OSError, ValueError):
                continue
            if candidate == real:
                identity = (st.st_dev, st.st_ino)
            chain.add((st.st_dev, st.st_ino))
        return cls(path, real, identity, frozenset(chain))


def inside(child: Place, parent: Place) -> bool:
    """``child`` is ``parent`` or inside it, by any of the paths that reach them."""
    if within(child.path, parent.path) or within(child.real, parent.real):
        return True
    return parent.identity is not None and parent.identity in child.chain


def _how(child: Place, parent: Place) -> str:
    """Nothing when the paths show it; else how the filesystem does."""
    if within(child.path, parent.path):
        return ""
    if child.real == parent.real:
        return f" (both are {child.real} once symbolic links are resolved)"
    if within(child.real, parent.real):
        return f" ({child.real} is inside {parent.real} once symbolic links are resolved)"
    return " (the same folder by another path: a mount)"


_At = Callable[[Path], Place]


class OverlapChecks(ParserBase):
    """The checks across sections, run once every section is parsed; with
    :attr:`filesystem` the folders are looked up too (links, mounts), else compared
    as written."""

    filesystem: bool = False

    def _check_overlaps(
        self,
        archives: list[tuple[int, ArchiveConfig]],
        inboxes: list[tuple[int, InboxConfig]],
        state_dirs: list[tuple[KeyPath, Path]],
        files: list[tuple[KeyPath, Path]],
    ) -> None:
        """``state_dirs``: the state directory (the file's, and the running one on a
        reload); ``files``: (key, path) of every file the daemon reads or writes, which
        no inbox may hold."""
        places: dict[Path, Place] = {}

        def at(path: Path) -> Place:
            if path not in places:
                places[path] = Place.of(path) if self.filesystem else Place.written(path)
            return places[path]

        for n, (i, a) in enumerate(archives):
            for j, b in archives[n + 1 :]:
                if inside(at(b.path), at(a.path)) or inside(at(a.path), at(b.path)):
                    how = _how(at(b.path), at(a.path)) or _how(at(a.path), at(b.path))
                    self.error(
                        ("archives", j, "path"),
                        f"{b.path} overlaps archive {a.name!r} at {a.path} (archives[{i}])"
                        f"{how}; archives must not be nested",
                    )
        for n, (i, inbox) in enumerate(inboxes):
            self._inbox_overlaps(i, inbox, archives, at)
            for j, other in inboxes[n + 1 :]:
                mine, theirs = at(inbox.path), at(other.path)
                if inside(theirs, mine) or inside(mine, theirs):
                    how = _how(theirs, mine) or _how(mine, theirs)
                    self.error(
                        ("inboxes", j, "path"),
                        f"{other.path} overlaps inboxes[{i}] ({inbox.path}){how}; "
                        "one inbox must not be inside another",
                    )
            for key, folder in state_dirs:
                if inside(at(inbox.path), at(folder)):
                    self.error(
                        ("inboxes", i, "path"),
                        f"{inbox.path} is inside the state directory {folder} ({key[0]})"
                        f"{_how(at(inbox.path), at(folder))}; the daemon would deposit its "
                        "own journal and receipts",
                        hint="keep inboxes outside state_dir",
                    )
        for _, folder in state_dirs:
            for k, archive in archives:
                if inside(at(archive.path), at(folder)):
                    self.error(
                        ("archives", k, "path"),
                        f"{archive.path} is inside the state directory {folder}"
                        f"{_how(at(archive.path), at(folder))}",
                        hint="keep archives outside state_dir",
                    )
        self._file_overlaps(archives, inboxes, state_dirs, files, at)

    def _inbox_overlaps(
        self,
        i: int,
        inbox: InboxConfig,
        archives: list[tuple[int, ArchiveConfig]],
        at: _At,
    ) -> None:
        mine = at(inbox.path)
        for k, archive in archives:
            theirs = at(archive.path)
            if inside(mine, theirs):
                self.error(
                    ("inboxes", i, "path"),
                    f"{inbox.path} is inside archive {archive.name!r} ({archive.path}, "
                    f"archives[{k}]){_how(mine, theirs)}; the daemon would take stored "
                    "files back out of it",
                    hint="keep inboxes outside archive folders",
                )
            elif inside(theirs, mine):
                self.error(
                    ("inboxes", i, "path"),
                    f"{inbox.path} contains archive {archive.name!r} ({archive.path}, "
                    f"archives[{k}]){_how(theirs, mine)}; the daemon would deposit its own "
                    "archive",
                    hint="keep archive folders outside inboxes",
                )

    def _file_overlaps(
        self,
        archives: list[tuple[int, ArchiveConfig]],
        inboxes: list[tuple[int, InboxConfig]],
        state_dirs: list[tuple[KeyPath, Path]],
        files: list[tuple[KeyPath, Path]],
        at: _At,
    ) -> None:
        written = {("control_socket",), ("metrics", "textfile")}
        for key, target in state_dirs + files:
            for i, inbox in inboxes:
                if inside(at(target), at(inbox.path)):
                    self.error(
                        key,
                        f"{target} is inside inboxes[{i}] ({inbox.path})"
                        f"{_how(at(target), at(inbox.path))}; the daemon would deposit "
                        "it; move it out",
                    )
            if key not in written and key[:1] != ("state_dir",):
                continue  # only read: harmless in an archive
            for _, archive in archives:
                if inside(at(target), at(archive.path)):
                    self.error(
                        key,
                        f"{target} is inside archive {archive.name!r} ({archive.path})"
                        f"{_how(at(target), at(archive.path))}; move it out",
                    )
        for i, inbox in inboxes:
            if inside(at(self.source), at(inbox.path)):
                self.error(
                    ("inboxes", i, "path"),
                    f"{inbox.path} holds this configuration file {self.source}; the daemon "
                    "would deposit it",
                    hint="keep the configuration outside inboxes",
                )


def daemon_files(
    registry_auth: Path | None,
    control_socket: Path,
    metrics: MetricsConfig,
    alerts: AlertsConfig,
) -> list[tuple[KeyPath, Path]]:
    """(key, path) of the files the daemon reads or writes, for the checks."""
    found: list[tuple[KeyPath, Path | None]] = [
        (("control_socket",), control_socket),
        (("registry_auth",), registry_auth),
        (("metrics", "textfile"), metrics.textfile),
    ]
    if alerts.webhook is not None:
        found.append((("alerts", "webhook", "token_file"), alerts.webhook.token_file))
    if alerts.email is not None:
        found.append((("alerts", "email", "auth_file"), alerts.email.auth_file))
        found.append((("alerts", "email", "cafile"), alerts.email.cafile))
    return [(key, path) for key, path in found if path is not None]
