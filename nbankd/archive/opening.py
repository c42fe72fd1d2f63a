"""Creating and opening neurobank archives: ``nbank.json``, ``README.md``,
``.gitignore``, and the ``resources/`` and ``staging/`` folders with the policy's
group and modes (what ``nbank init`` 0.13 writes); :func:`open_archive` reads
``nbank.json`` back into an :class:`~nbankd.archive.layout.Archive`, with the bounded
reader of :mod:`nbankd.smallfile` (any local user can put a FIFO or a link to a device
in a folder the registry lists as an archive: it must not hang nor fill memory).
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.archive.access import apply_access, chgrp
from nbankd.archive.fsops import fsync_dir, write_atomic
from nbankd.archive.layout import (
    CONFIG_NAME,
    CONFIG_SCHEMA,
    DEFAULT_UMASK,
    GITIGNORE_NAME,
    POLICY_KEYS,
    README_NAME,
    RESOURCES_NAME,
    STAGING_NAME,
    AccessPolicy,
    Archive,
    ArchivePolicy,
    unavailable,
)
from nbankd.smallfile import SmallFileError, read_regular

#: the largest ``nbank.json`` read (nbank's are a few hundred bytes)
ARCHIVE_CONFIG_MAX_BYTES = 1 << 20

_README_TEXT = """\
# Neurobank archive

This folder is a data archive managed with neurobank
(https://github.com/melizalab/neurobank). Every file stored here is a registered
*resource*: it has a unique identifier, its bytes never change, and the registry
named in `nbank.json` records which archives hold it.

## What is here

- `nbank.json`: the archive's configuration (registry address, deposit policy,
  owner, group and permissions).
- `README.md`: this description. Add notes about the archive's contents below.
- `resources/`: the stored resources. Each one lives in a sub-folder named after the
  first two characters of its identifier, e.g. `resources/ab/abcd1234.wav`.
- `staging/`: files being prepared for deposit. Anything left in it after an
  interrupted deposit can be deleted.

Do not add, rename or edit files under `resources/` by hand. Deposit them with
`nbank deposit` or through an nbankd inbox, which register each file and set the
group and permissions `nbank.json` asks for. `nbank archive check` compares the
folder with the registry and reports anything out of place.

## Contents

"""


def ensure_staging(archive: Archive) -> Path:
    """Returns ``staging/``, creating it (with the layout mode) if it is missing."""
    staging = archive.staging_dir
    try:
        os.mkdir(staging, 0o700)
    except FileExistsError:
        return staging
    except OSError as err:
        raise unavailable(archive, err, f"creating {staging}") from err
    try:
        apply_access(archive, staging)
        fsync_dir(archive.path)
    except OSError as err:
        raise unavailable(archive, err, f"creating {staging}") from err
    return staging


# --- creating and opening ------------------------------------------------------------


def _group_name(group: str | None) -> str:
    if group is None:
        return grp.getgrgid(os.getgid()).gr_name
    try:
        grp.getgrnam(group)
    except KeyError:
        raise errors.ArchiveError(
            f"group '{group}' does not exist", hint="create it or choose another group"
        ) from None
    return group


def _config_dict(
    registry_url: str, user: str | None, group: str, umask: int, read_only: bool
) -> dict[str, Any]:
    return {
        "$schema": CONFIG_SCHEMA,
        "project": {"name": None, "description": None},
        "owner": {"name": None, "email": None},
        "registry": registry_url,
        "policy": {
            "auto_identifiers": False,
            "auto_id_type": None,
            "keep_extensions": True,
            "allow_directories": False,
            "require_hash": True,
            "access": {
                "user": user,
                "group": group,
                "umask": umask,
                "read_only_resources": read_only,
            },
        },
    }


def _write_new(path: Path, text: str, mode: int) -> None:
    """Writes a new file whole or not at all, never replacing one (the folder fsynced)."""
    try:
        write_atomic(path, text.encode("utf-8"), mode=mode, replace=False)
    except FileExistsError:
        raise errors.ArchiveError(
            f"'{path}' already exists", hint="nbankctl init never overwrites files"
        ) from None


def _already_written(path: Path, text: str, finish: bool) -> bool:
    """Whether ``path`` exists holding ``text`` (an earlier init of the same settings
    wrote it); raises ArchiveError when it exists otherwise, or at all without
    ``finish``."""
    if not os.path.lexists(path):
        return False
    if finish:
        try:
            with open(path, "rb", opener=_nofollow) as f:
                found = f.read(len(text.encode("utf-8")) + 1)
        except OSError:
            found = None
        if found == text.encode("utf-8"):
            return True
        raise errors.ArchiveError(
            f"'{path}' already exists and is not what nbankctl init writes with these options",
            hint="nbankctl init never overwrites files: give the options the first run "
            "had, or move the file aside",
        )
    raise errors.ArchiveError(
        f"'{path}' already exists", hint="nbankctl init never overwrites files"
    )


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def create_archive(
    path: str | os.PathLike[str],
    registry_url: str,
    *,
    group: str | None = None,
    umask: int = DEFAULT_UMASK,
    shared: bool = False,
    read_only_resources: bool = True,
    finish: bool = False,
    **policy: Any,
) -> Archive:
    """Creates a neurobank archive in ``path`` as ``nbank init`` (0.13) would, and opens it.

    Writes ``nbank.json``, ``README.md`` and ``.gitignore`` and makes ``resources/`` and
    ``staging/``, creating ``path`` and its parents as needed. ``group`` defaults to the
    current user's primary group; ``shared`` records no owner. ``policy`` may set
    ``auto_identifiers``, ``auto_id_type``, ``keep_extensions``, ``allow_directories``,
    ``require_hash``. Registers nothing: the caller registers the archive.

    Raises ArchiveError naming the file if any file it would write already exists (nothing
    is written then) or the group does not exist; TypeError for an unknown policy key.
    ``finish``: an earlier run with the same settings stopped half way (a full disk):
    files it wrote are kept when they hold exactly what this run would write (any other
    content is refused, naming the file), and the missing ones are written.
    """
    unknown = sorted(set(policy) - set(POLICY_KEYS))
    if unknown:
        raise TypeError(f"unknown archive policy key(s): {', '.join(unknown)}")
    root = Path(path).resolve(strict=False)
    group = _group_name(group)
    umask &= 0o777
    user = None if shared else pwd.getpwuid(os.geteuid()).pw_name
    config = _config_dict(registry_url, user, group, umask, read_only_resources)
    config["policy"].update(policy)
    texts = {
        README_NAME: _README_TEXT,
        CONFIG_NAME: json.dumps(config, indent=4),
        GITIGNORE_NAME: f"{RESOURCES_NAME}/\n{STAGING_NAME}/\n",
    }
    written = {name for name in texts if _already_written(root / name, texts[name], finish)}
    file_mode = 0o666 & ~umask
    try:
        (root / RESOURCES_NAME).mkdir(parents=True, exist_ok=True)
        (root / STAGING_NAME).mkdir(exist_ok=True)
        for name, text in texts.items():
            if name not in written:
                _write_new(root / name, text, file_mode)
        archive = open_archive(root)
        for name in (README_NAME, CONFIG_NAME, GITIGNORE_NAME):
            chgrp(archive, root / name)
        apply_access(archive, archive.resources_dir)
        apply_access(archive, archive.staging_dir)
        fsync_dir(root)
    except errors.NbankdError:
        raise
    except OSError as err:
        raise unavailable(root, err, "creating the archive") from err
    return archive


def _umask_value(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value & 0o777
    if isinstance(value, str):
        return int(value, 8) & 0o777
    raise ValueError


def _parse_config(config: Any, where: Path) -> tuple[str, ArchivePolicy]:
    def bad(key: str, why: str) -> errors.NotAnArchive:
        return errors.NotAnArchive(
            f"{where}: '{key}' {why}", hint="fix nbank.json, or run `nbankctl init` on a new folder"
        )

    if not isinstance(config, dict):
        raise bad("(top level)", "is not a JSON object")
    registry = config.get("registry")
    if not isinstance(registry, str) or not registry:
        raise bad("registry", "is missing or not a URL")
    pol = config.get("policy") or {}
    if not isinstance(pol, dict):
        raise bad("policy", "is not a JSON object")
    acc = pol.get("access") or {}
    if not isinstance(acc, dict):
        raise bad("policy.access", "is not a JSON object")
    try:
        umask = _umask_value(acc.get("umask", DEFAULT_UMASK))
    except ValueError:
        raise bad("policy.access.umask", f"is not an octal umask: {acc.get('umask')!r}") from None
    access = AccessPolicy(
        user=acc.get("user") or None,
        group=acc.get("group") or None,
        umask=umask,
        read_only_resources=bool(acc.get("read_only_resources", False)),
    )
    auto_id_type = pol.get("auto_id_type")
    if auto_id_type is not None and not isinstance(auto_id_type, str):
        raise bad("policy.auto_id_type", "is not a string")
    policy = ArchivePolicy(
        auto_identifiers=bool(pol.get("auto_identifiers", False)),
        auto_id_type=auto_id_type,
        keep_extensions=bool(pol.get("keep_extensions", True)),
        allow_directories=bool(pol.get("allow_directories", False)),
        require_hash=bool(pol.get("require_hash", True)),
        access=access,
    )
    return registry, policy


def open_archive(path: str | os.PathLike[str]) -> Archive:
    """Opens the archive in ``path``, reading old and new forms of ``nbank.json``.

    Older forms are accepted: umask as an octal string, no ``read_only_resources``
    (neurobank then treats resources as writable), no ``auto_id_type``, no ``staging/``
    (created on demand by :func:`ensure_staging`). Raises NotAnArchive naming
    the file if nbank.json is missing or malformed, or is not a regular file (a
    FIFO, a device: never opened so that it blocks) or is larger than
    :data:`ARCHIVE_CONFIG_MAX_BYTES`; ArchiveUnavailable if it cannot be read (I/O
    error, permissions).
    """
    root = Path(path).absolute()
    cfg_path = root / CONFIG_NAME
    try:
        raw, _st = read_regular(cfg_path, ARCHIVE_CONFIG_MAX_BYTES)
    except SmallFileError as err:
        raise _config_unreadable(root, cfg_path, err) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise errors.NotAnArchive(f"{cfg_path} is not UTF-8 text: {err}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise errors.NotAnArchive(
            f"{cfg_path} is not valid JSON: {err}", hint="fix the file or restore it from a copy"
        ) from None
    registry, policy = _parse_config(config, cfg_path)
    try:
        resolved = root.resolve(strict=True)
    except OSError as err:
        raise unavailable(root, err, "resolving its path") from err
    return Archive(resolved, registry, policy, config)


def _config_unreadable(root: Path, cfg_path: Path, err: SmallFileError) -> errors.ArchiveError:
    """The error for an ``nbank.json`` :func:`~nbankd.smallfile.read_regular` refused."""
    if err.reason == "missing" or err.errno == errno.ENOTDIR:
        return errors.NotAnArchive(
            f"{cfg_path} does not exist",
            hint="is the filesystem mounted? To make a new archive there, run `nbankctl init`",
        )
    if err.reason == "not-regular":
        if err.noun == "a folder":
            return errors.NotAnArchive(f"{cfg_path} is a directory, not a file")
        return errors.NotAnArchive(
            f"{cfg_path} is {err.noun}, not a file: not an archive",
            hint="an archive's nbank.json is a regular file; replace it from a copy",
        )
    if err.reason == "too-large":
        return errors.NotAnArchive(
            f"{cfg_path} is larger than {ARCHIVE_CONFIG_MAX_BYTES >> 20} MiB: not an "
            "archive's nbank.json",
            hint="replace it from a copy",
        )
    return unavailable(root, OSError(err.errno, err.strerror), f"reading {cfg_path}")


__all__ = ["ARCHIVE_CONFIG_MAX_BYTES", "create_archive", "ensure_staging", "open_archive"]
