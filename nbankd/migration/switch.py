"""Pointing archives and the configuration at a new registry, durably and with backups.

- :func:`rewrite_nbank_json` changes the ``registry`` field of an archive's
  ``nbank.json`` and nothing else (key order kept), after copying the file to
  ``nbank.json.bak-<time>`` beside it; the new file is written to a temporary
  file, fsynced and renamed over the old one, with the old mode and owner.
- :func:`edit_config_text` rewrites the top-level ``registry:`` line of a YAML
  configuration (keeping its comment), comments out ``registry_url:`` (it only
  applies to the embedded registry) and sets ``registry_auth:`` when asked. It
  edits lines, never re-dumps the file, so comments and layout stay; the result is
  accepted only if it parses to exactly the old settings with those keys changed.
  Anything it cannot edit that way (flow style, a multi-line value, anchors) is
  *unsafe*: it then returns the exact edits for a person to make instead.
- :func:`replace_file` writes a file the same way as ``nbank.json``, with a backup.

Backups are never overwritten: a second one in the same second gets ``.1`` added.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nbankd.archive.fsops import write_atomic

BACKUP_SUFFIX = ".bak-"
_KEY_RE = re.compile(r"^(?P<key>registry|registry_url|registry_auth)[ \t]*:(?P<rest>[^\r\n]*)")
_VALUE_RE = re.compile(r"^(?P<value>.*?)(?P<comment>[ \t]+#.*)?$")
_MAX_BACKUPS = 1000


def backup_name(path: Path, stamp: str, n: int = 0) -> Path:
    """``NAME.bak-STAMP``, or ``NAME.bak-STAMP.N`` for the N-th backup of the same second."""
    return path.with_name(f"{path.name}{BACKUP_SUFFIX}{stamp}{f'.{n}' if n else ''}")


def _backup(path: Path, data: bytes, like: os.stat_result, stamp: str) -> Path:
    """Writes a new backup of ``path`` (never overwriting one: a counter is added)."""
    for n in range(_MAX_BACKUPS):
        backup = backup_name(path, stamp, n)
        if os.path.lexists(backup):
            continue
        try:
            write_atomic(
                backup,
                data,
                mode=stat.S_IMODE(like.st_mode),
                owner=(like.st_uid, like.st_gid),
                replace=False,
            )
        except FileExistsError:  # another run took this name meanwhile
            continue
        return backup
    raise FileExistsError(errno.EEXIST, f"{_MAX_BACKUPS} backups of {stamp} exist", str(path))


def replace_file(path: Path, data: bytes, stamp: str) -> Path:
    """Replaces a regular file's content durably, keeping a backup; returns the backup.

    The backup (``NAME.bak-STAMP``, with ``.N`` added if that exists) is a new file,
    durable before the replacement begins; the replacement keeps the old mode and
    (when allowed) owner.
    """
    path = Path(path)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a symlink?); not rewriting it", str(path))
    backup = _backup(path, path.read_bytes(), st, stamp)
    write_atomic(path, data, mode=stat.S_IMODE(st.st_mode), owner=(st.st_uid, st.st_gid))
    return backup


# --- nbank.json ------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveUpdate:
    """What to do with one archive's nbank.json: ``rewrite``, ``already`` (names the new
    registry), ``other`` (names a third registry: left alone) or ``unreadable``."""

    path: Path
    action: str
    registry: str | None = None
    message: str = ""


def same_registry(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def check_nbank_json(path: Path, old_urls: str | Iterable[str], new_url: str) -> ArchiveUpdate:
    """What to do with one nbank.json: ``old_urls`` are every URL of the old registry
    (the embedded registry's ``registry_url`` and its database's ``file:`` URL)."""
    olds = [old_urls] if isinstance(old_urls, str) else list(old_urls)
    try:
        if os.path.islink(path):
            return ArchiveUpdate(path, "unreadable", None, "is a symlink; edit it by hand")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ArchiveUpdate(path, "unreadable", None, "does not exist (filesystem unmounted?)")
    except (OSError, ValueError) as err:
        return ArchiveUpdate(path, "unreadable", None, f"cannot be read: {err}")
    current = data.get("registry") if isinstance(data, dict) else None
    if not isinstance(current, str):
        return ArchiveUpdate(path, "unreadable", None, "has no 'registry' field")
    if same_registry(current, new_url):
        return ArchiveUpdate(path, "already", current, "names the new registry already")
    if any(same_registry(current, old) for old in olds):
        return ArchiveUpdate(path, "rewrite", current)
    return ArchiveUpdate(
        path, "other", current, f"names another registry ({current}); left as it is"
    )


def rewrite_nbank_json(path: Path, new_url: str, stamp: str) -> Path:
    """Sets ``registry`` in nbank.json to ``new_url``; returns the backup's path."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["registry"] = new_url
    return replace_file(path, json.dumps(data, indent=4).encode("utf-8"), stamp)


# --- the configuration file ----------------------------------------------------------


@dataclass(frozen=True)
class ConfigEdit:
    """The new text of a configuration, or (``text`` None) why it is unsafe to edit."""

    text: str | None
    edits: tuple[str, ...] = ()
    unsafe: str = ""
    changed: bool = field(default=True)


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain when that reads back the same, else quoted."""
    try:
        plain_ok = yaml.safe_load(f"k: {value}") == {"k": value} and " #" not in value
    except yaml.YAMLError:
        plain_ok = False
    return value if plain_ok else json.dumps(value)


def _is_continuation(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#") and line[:1] in (" ", "\t")


def edit_config_text(
    text: str, registry: str, *, registry_auth: str | None = None, stamp: str = ""
) -> ConfigEdit:
    """Points a configuration's text at ``registry`` (see the module docstring)."""
    edits = [f"set 'registry: {registry}'"]
    try:
        before = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ConfigEdit(None, tuple(edits), f"it does not parse as YAML ({first})")
    if before is None:
        before = {}
    if not isinstance(before, dict):
        return ConfigEdit(None, tuple(edits), "it is not a mapping of settings")
    expected: dict[str, Any] = dict(before)
    expected["registry"] = registry
    if "registry_url" in expected:
        expected.pop("registry_url")
        edits.append("remove 'registry_url' (it only applies to the embedded registry)")
    if registry_auth is not None:
        expected["registry_auth"] = registry_auth
        edits.append(f"set 'registry_auth: {registry_auth}'")
    if expected == before:
        return ConfigEdit(text, tuple(edits), changed=False)

    lines = text.splitlines(keepends=True)
    found: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _KEY_RE.match(line)
        if m is None:
            continue
        key = m["key"]
        if key in found:
            return ConfigEdit(None, tuple(edits), f"'{key}' appears twice")
        value = _VALUE_RE.match(m["rest"])
        assert value is not None
        raw = value["value"].strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not raw or raw[0] in "|>&*!{[" or _is_continuation(nxt):
            return ConfigEdit(None, tuple(edits), f"'{key}' has a value this tool does not edit")
        found[key] = i

    def ending(line: str) -> str:
        return line[len(line.rstrip("\r\n")) :] or "\n"

    def set_line(i: int, key: str, value: str) -> None:
        m = _KEY_RE.match(lines[i])
        assert m is not None
        v = _VALUE_RE.match(m["rest"])
        comment = v["comment"] if v is not None and v["comment"] else ""
        lines[i] = f"{key}: {_scalar(value)}{comment}{ending(lines[i])}"

    if "registry" in found:
        set_line(found["registry"], "registry", registry)
    else:
        at = 0
        while at < len(lines) and (
            not lines[at].strip() or lines[at].lstrip().startswith(("#", "%", "---"))
        ):
            at += 1
        if at == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.insert(at, f"registry: {_scalar(registry)}\n")
        found = {k: (i + 1 if i >= at else i) for k, i in found.items()}
        found["registry"] = at
    if "registry_url" in found:
        i = found["registry_url"]
        note = f"  # replaced by 'registry' (nbankctl registry switch {stamp})".rstrip()
        lines[i] = f"# {lines[i].rstrip(chr(13) + chr(10))}{note}{ending(lines[i])}"
    if registry_auth is not None:
        if "registry_auth" in found:
            set_line(found["registry_auth"], "registry_auth", registry_auth)
        else:
            i = found["registry"]
            lines.insert(i + 1, f"registry_auth: {_scalar(registry_auth)}\n")
    new_text = "".join(lines)
    try:
        after = yaml.safe_load(new_text)
    except yaml.YAMLError:
        return ConfigEdit(None, tuple(edits), "editing lines would not give valid YAML")
    if after != expected:
        return ConfigEdit(None, tuple(edits), "editing lines would change other settings")
    return ConfigEdit(new_text, tuple(edits))


def config_unsafe_reason(path: Path) -> str:
    """Why the configuration file itself must not be rewritten in place, or ""."""
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"cannot read it: {err.strerror or err}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink (managed elsewhere?)"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if not os.access(path.parent, os.W_OK):
        return f"its folder {path.parent} is not writable by this user"
    return ""


def write_config(
    path: Path, text: str, stamp: str, *, validate: Callable[[Path], object] | None = None
) -> Path:
    """Replaces the configuration with ``text`` (backup kept); returns the backup's path.

    ``validate`` is called on a copy in the same folder first (relative paths resolve
    the same); it raises to refuse the new text, and the file is then left untouched.
    """
    if validate is not None:
        probe = path.with_name(f".{path.name}.{os.getpid()}.check")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            validate(probe)
        finally:
            os.unlink(probe)
    return replace_file(path, text.encode("utf-8"), stamp)


__all__ = [
    "ArchiveUpdate",
    "ConfigEdit",
    "backup_name",
    "check_nbank_json",
    "config_unsafe_reason",
    "edit_config_text",
    "replace_file",
    "rewrite_nbank_json",
    "same_registry",
    "write_config",
]
