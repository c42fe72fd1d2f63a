"""The parsed configuration: frozen, typed records built once by :mod:`.loader`.

Paths are absolute and normalised (``~`` expanded, relative paths resolved
against the configuration file's folder, symlinks *not* resolved). Durations
are float seconds. Mappings are read-only views.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Literal

from nbankd import errors
from nbankd.names import CANARY_NAME, WORK_DIR_NAME

DEFAULT_CONFIG_PATH = Path("/etc/nbankd/config.yaml")
CONFIG_ENV = "NBANKD_CONFIG"
EMBEDDED = "embedded"
DEFAULT_STATE_DIR = Path("/var/lib/nbankd")
DEFAULT_CONTROL_SOCKET = Path("/run/nbankd/control.sock")
DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_IGNORE: tuple[str, ...] = ("*.tmp", "*.part", ".*")
EMBEDDED_DB_NAME = "registry.sqlite3"
JOURNAL_NAME = "journal.sqlite3"  # the deposit journal, in state_dir
ARCHIVE_SCHEME = "neurobank"

Ready = Literal["settle", "marker"]
Watch = Literal["auto", "poll"]
Placement = Literal["copy", "rename"]
Directories = Literal["files", "resources", "zip"]
FileMetadata = Literal["read", "skip", "override"]
LogFormat = Literal["auto", "console", "json", "journal"]
LogLevel = Literal["debug", "info", "warning", "error"]
Severity = Literal["error", "warning"]

READY_VALUES: tuple[str, ...] = ("settle", "marker")
WATCH_VALUES: tuple[str, ...] = ("auto", "poll")
PLACEMENT_VALUES: tuple[str, ...] = ("copy", "rename")
DIRECTORIES_VALUES: tuple[str, ...] = ("files", "resources", "zip")
FILE_METADATA_VALUES: tuple[str, ...] = ("read", "skip", "override")
LOG_FORMAT_VALUES: tuple[str, ...] = ("auto", "console", "json", "journal")
LOG_LEVEL_VALUES: tuple[str, ...] = ("debug", "info", "warning", "error")


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where (file, line, key path) and why.

    ``str()`` reads ``file:line: key: reason (hint)``; the severity is not part of it.
    """

    source: Path | None
    key: str  # e.g. "inboxes[1].settle_seconds"; "" for the file as a whole
    message: str
    line: int | None = None  # 1-based, when known
    severity: Severity = "error"
    hint: str = ""
    #: machine-readable cause, as in :mod:`nbankd.errors` ("config", "registry-unavailable",
    #: "auth", ...): lets check-config exit 3 when the registry could not be asked
    code: str = "config"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        where = str(self.source) if self.source is not None else "<configuration>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: "
        if self.key:
            text += f"{self.key}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class InvalidConfig(errors.ConfigError):
    """A configuration with one or more errors; ``problems`` lists every one."""

    def __init__(self, source: Path | None, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        where = str(source) if source is not None else "the configuration"
        count = sum(1 for p in self.problems if p.is_error)
        lines = [f"{where}: {count} problem{'s' if count != 1 else ''} in the configuration:"]
        lines += [f"  {p}" for p in self.problems if p.is_error]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ArchiveConfig:
    """A neurobank archive the daemon deposits into."""

    path: Path
    name: str
    create: bool = False

    @property
    def root(self) -> str:
        """The root registered with the registry (scheme ``neurobank``)."""
        return str(self.path)

    @property
    def nbank_json(self) -> Path:
        return self.path / "nbank.json"

    def has_root(self, scheme: str, root: str) -> bool:
        """True when a registry record of (``scheme``, ``root``) names this archive's
        folder: scheme ``neurobank``, root its path as given or with symbolic links
        resolved (as ``nbank init`` registers it)."""
        return scheme == ARCHIVE_SCHEME and os.path.normpath(root) in {
            str(self.path),
            resolved_path(self.path),
        }


def resolved_path(path: Path) -> str:
    """``path`` with symbolic links resolved, or as given when that fails."""
    with contextlib.suppress(OSError, RuntimeError):
        return str(path.resolve())
    return str(path)


@dataclass(frozen=True)
class InboxConfig:
    """A watched folder whose finished files are deposited into one archive."""

    path: Path
    archive: str  # name of the archive (resolved from a name or a path)
    dtype: str | None = None
    dtype_by_extension: Mapping[str, str] = field(default_factory=_empty_mapping, hash=False)
    metadata: Mapping[str, Any] = field(default_factory=_empty_mapping, hash=False)
    path_metadata: re.Pattern[str] | None = None
    auto_id: bool | None = None  # None: follow the archive's policy
    recursive: bool = True
    settle_seconds: float = 10.0
    ready: Ready = "settle"
    watch: Watch = "auto"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    stall_after: float = 3600.0
    rescan_every: float = 300.0
    watch_check_every: float = 30.0
    fallback_poll_every: float = 5.0
    placement: Placement = "copy"
    verify: bool = True
    expect_every: float | None = None  # alert when no deposit came for this long
    directories: Directories = "files"  # zip: each top-level folder deposited as its zip
    file_metadata: FileMetadata = "read"  # the datatype's metadata reader: read, skip, override
    rejected_dir: str = "rejected"  # normalised, relative to path
    #: rejected folders the inbox used before ``rejected_dir`` changed and that still
    #: exist: never a key of the file (the loader leaves it empty); the daemon fills it
    #: from its record in state_dir (:mod:`nbankd.daemon.rejected_dirs`)
    earlier_rejected_dirs: tuple[str, ...] = field(default=(), metadata={"config_key": False})
    #: the work folders (``.nbank``) of former inboxes lying inside this one (an inbox
    #: widened to a folder above it) that still exist: never scanned nor watched;
    #: filled by the daemon like ``earlier_rejected_dirs``
    former_work_dirs: tuple[str, ...] = field(default=(), metadata={"config_key": False})

    @property
    def folder_resources(self) -> bool:
        """Each top-level folder is one input (``directories: resources`` or ``zip``)."""
        return self.directories in ("resources", "zip")

    @functools.cached_property
    def work_dir(self) -> Path:
        """Where the daemon keeps in-progress files (same filesystem as the inbox);
        joined once (every step of every deposit asks)."""
        return self.path / WORK_DIR_NAME

    @property
    def exclusions(self) -> tuple[str, ...]:
        """Relative paths no scan lists and no wake-up reports: the work folder, the
        rejected folder (and every earlier one still there), the work folders of
        former inboxes inside it and the watch's liveness canary."""
        return (
            WORK_DIR_NAME,
            self.rejected_dir,
            *self.earlier_rejected_dirs,
            *self.former_work_dirs,
            CANARY_NAME,
        )

    @functools.cached_property
    def rejected_path(self) -> Path:
        """Absolute path of the rejected folder (always inside the inbox), joined once."""
        return self.path / self.rejected_dir

    @property
    def rejected_dirs(self) -> tuple[str, ...]:
        """The rejected folder, then the earlier ones still there (relative paths)."""
        return (self.rejected_dir, *self.earlier_rejected_dirs)

    def rejected_dir_of(self, relpath: str) -> tuple[str, str] | None:
        """(the rejected folder, current or earlier, that holds ``relpath``, the path
        relative to it; ``""`` for the folder itself), or None outside all of them.
        Of nested rejected folders the innermost holds it."""
        for folder in sorted(self.rejected_dirs, key=len, reverse=True):
            if relpath == folder:
                return folder, ""
            if relpath.startswith(folder + "/"):
                return folder, relpath[len(folder) + 1 :]
        return None

    def dtype_for(self, relpath: str) -> str | None:
        """The datatype from ``dtype_by_extension`` (last suffix, any case), else ``dtype``."""
        suffix = PurePosixPath(relpath).suffix.lower()
        if suffix and suffix in self.dtype_by_extension:
            return self.dtype_by_extension[suffix]
        return self.dtype

    def datatypes_needed(self) -> set[str]:
        names = set(self.dtype_by_extension.values())
        if self.dtype is not None:
            names.add(self.dtype)
        return names


@dataclass(frozen=True)
class ControlConfig:
    """Who may use the control socket (user or group names)."""

    readers: tuple[str, ...] = ()
    admins: tuple[str, ...] = ("root",)


@dataclass(frozen=True)
class AuditConfig:
    every: float = 86400.0  # seconds between scheduled audits
    scrub_days: int = 30  # every file re-hashed once in this many days; 0 = never
    max_mb_per_s: float = 200.0  # read-rate cap for scrubbing; 0 = unlimited
    workers: int = 0  # reading threads; 0 = automatic (two per core, 4 to 32)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (``metrics:``): served over HTTP and/or written as a
    node_exporter textfile; both off by default."""

    listen: tuple[str, int] | None = None  # (host, port) of the HTTP /metrics endpoint
    textfile: Path | None = None  # node_exporter's textfile collector file
    textfile_every: float = 15.0  # seconds between two writes of the textfile


@dataclass(frozen=True)
class WebhookConfig:
    """``alerts.webhook``: a JSON POST per alert message."""

    url: str
    token_file: Path | None = None  # sent as "Authorization: Bearer TOKEN"


@dataclass(frozen=True)
class EmailConfig:
    """``alerts.email``: one mail per alert message."""

    to: tuple[str, ...]
    from_: str = field(metadata={"config_name": "from"})
    smtp: tuple[str, int] = ("localhost", 25)
    starttls: bool = True
    auth_file: Path | None = None  # "user:password" (or a systemd credential)
    cafile: Path | None = None  # CA certificates the SMTP server's is checked against


@dataclass(frozen=True)
class AlertsConfig:
    """``alerts:`` who is told when something is wrong, and when."""

    webhook: WebhookConfig | None = None
    email: EmailConfig | None = None
    unavailable_after: float = 600.0  # a registry/archive outage worth telling
    group_wait: float = 60.0  # a new problem waits this long for others to join it
    repeat_every: float = 4 * 3600.0  # a problem still there is told again this often
    check_every: float = 30.0  # seconds between two looks at the daemon's status

    @property
    def enabled(self) -> bool:
        return self.webhook is not None or self.email is not None


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "auto"
    level: LogLevel = "info"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one daemon, parsed once from ``source``."""

    source: Path = field(metadata={"config_key": False})  # the file, not a key in it
    registry: str = EMBEDDED  # "embedded", or a URL ending with "/"
    registry_url: str | None = None  # the URL an embedded registry is served at
    #: other addresses of the same registry that archives' nbank.json may name
    registry_aliases: tuple[str, ...] = ()
    registry_auth: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    control: ControlConfig = ControlConfig()
    #: datatype name -> content type, from the ``datatypes`` section
    datatypes: Mapping[str, str] = field(default_factory=_empty_mapping, hash=False)
    archives: tuple[ArchiveConfig, ...] = ()
    inboxes: tuple[InboxConfig, ...] = ()
    audit: AuditConfig = AuditConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    #: non-fatal findings of parsing (e.g. ``verify: false``)
    warnings: tuple[Problem, ...] = field(
        default=(), compare=False, hash=False, metadata={"config_key": False}
    )

    @property
    def embedded(self) -> bool:
        return self.registry == EMBEDDED

    @property
    def embedded_db_path(self) -> Path:
        return self.state_dir / EMBEDDED_DB_NAME

    def archive_named(self, name: str) -> ArchiveConfig | None:
        for archive in self.archives:
            if archive.name == name:
                return archive
        return None

    def archive_for(self, inbox: InboxConfig) -> ArchiveConfig:
        archive = self.archive_named(inbox.archive)
        if archive is None:  # impossible for a Config built by the loader
            raise errors.ConfigError(f"inbox {inbox.path} names unknown archive {inbox.archive!r}")
        return archive

    def inbox_containing(self, path: Path | str) -> InboxConfig | None:
        """The inbox whose folder holds ``path`` (absolute), if any."""
        p = Path(path)
        for inbox in self.inboxes:
            if p == inbox.path or inbox.path in p.parents:
                return inbox
        return None

    def datatypes_needed(self) -> set[str]:
        """Every datatype the configuration names: inboxes' and the ``datatypes`` section's."""
        names = set(self.datatypes)
        for inbox in self.inboxes:
            names |= inbox.datatypes_needed()
        return names

    def content_type_for(self, dtype: str) -> str:
        """Content type for creating ``dtype`` (``datatypes`` section, else octet-stream)."""
        return self.datatypes.get(dtype) or DEFAULT_CONTENT_TYPE


def config_keys(model: type) -> tuple[str, ...]:
    """The keys a section of the file accepts: the fields of its typed record (named
    ``config_name`` when a field cannot bear the key's name, as ``from``), except those
    marked ``config_key: False`` (facts about the file, not keys in it)."""
    return tuple(
        f.metadata.get("config_name", f.name)
        for f in fields(model)
        if f.metadata.get("config_key", True)
    )
