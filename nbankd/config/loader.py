"""Reads and validates a configuration file into :class:`~.model.Config`, once.

Every problem is collected (not just the first), each naming the file, the
line when known, the key path (``inboxes[1].settle_seconds``) and the reason;
unknown keys get a "did you mean" suggestion. Nothing here touches the world
beyond reading the one file: see :mod:`.checks` for that.

Null values: ``key:`` with nothing after it is an error ("empty"), except for
keys where null has a meaning (``auto_id``, ``dtype``, ``name``,
``registry_url``, ``registry_auth``, content types under ``datatypes``) and for
collections (``archives``, ``inboxes``, ``datatypes``, ``metadata``,
``dtype_by_extension``), where it means empty.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

from nbankd.config.alerts_section import AlertsSection
from nbankd.config.durations import format_duration
from nbankd.config.inbox_section import InboxSections
from nbankd.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTENT_TYPE,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_STATE_DIR,
    EMBEDDED,
    LOG_FORMAT_VALUES,
    LOG_LEVEL_VALUES,
    ArchiveConfig,
    AuditConfig,
    Config,
    ControlConfig,
    InvalidConfig,
    LogConfig,
    LogFormat,
    LogLevel,
    MetricsConfig,
    Problem,
)
from nbankd.config.overlaps import OverlapChecks, daemon_files
from nbankd.config.parsing import (
    ACCEPTED_KEYS,
    ARCHIVE_ROOT_MAX,
    CONTENT_TYPE_MAX,
    MISSING,
    audit_workers,
    duplicate_key_problems,
    load_yaml,
)
from nbankd.config.sourcefile import read_config_file
from nbankd.config.values import (
    Bad,
    KeyPath,
    bad,
    check_bool,
    check_count,
    check_names,
    describe,
    duration,
    enum,
    http_url,
    is_local_host,
    listen_address,
    number,
    path_in,
    slug,
)
from nbankd.registry.base import ARCHIVE_NAME_MAX, DATATYPE_NAME_MAX

__all__ = [
    "ACCEPTED_KEYS",
    "find_config_path",
    "load_config",
    "parse_config",
    "parse_config_text",
]


# --- locating the file ---------------------------------------------------------------


def find_config_path(
    cli_value: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Path:
    """The configuration file to use: ``-c FILE``, else ``$NBANKD_CONFIG``, else the default.

    The result is absolute (``~`` expanded); whether it exists is for the loader to say.
    """
    env = os.environ if environ is None else environ
    chosen: str | os.PathLike[str] = DEFAULT_CONFIG_PATH
    if cli_value is not None and str(cli_value) != "":
        chosen = cli_value
    elif env.get(CONFIG_ENV):
        chosen = env[CONFIG_ENV]
    return Path(os.path.abspath(os.path.expanduser(chosen)))


# --- entry points --------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], *, running: Config | None = None, filesystem: bool = False
) -> Config:
    """Parses the file; raises :class:`~.model.InvalidConfig` (a ConfigError) listing
    every error. Warnings are kept in ``Config.warnings``.

    ``running``: the configuration of a running daemon that reloads the file: it keeps
    its ``state_dir`` and ``control_socket`` (they change only at restart; a warning
    says so when the file changes them), and the checks use those it keeps.

    ``filesystem``: also compare the configured folders as the filesystem has them
    (links resolved, device and inode: :mod:`.overlaps`). The daemon (start, reload)
    and check-config do; other readers of the file do not, since a hung network
    mount would hang every command that reads the configuration."""
    source = Path(os.path.abspath(os.path.expanduser(path)))
    config, problems = parse_config(source, running=running, filesystem=filesystem)
    if config is None:
        raise InvalidConfig(source, problems)
    return config


def parse_config(
    path: str | os.PathLike[str], *, running: Config | None = None, filesystem: bool = False
) -> tuple[Config | None, list[Problem]]:
    """Every problem (errors and warnings) of the file, and the Config when there is no
    error. Only a regular file is read (a FIFO or a device is refused), up to a size
    limit; a file other users may rewrite gets a warning."""
    source = Path(os.path.abspath(os.path.expanduser(path)))
    raw, found = read_config_file(source)
    if raw is None:
        return None, found
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [Problem(source, "", f"is not UTF-8 text (byte {err.start})")]
    config, problems = parse_config_text(text, source, running=running, filesystem=filesystem)
    problems = found + problems
    if config is not None and found:
        config = replace(config, warnings=(*found, *config.warnings))
    return config, problems


def parse_config_text(
    text: str, source: Path, *, running: Config | None = None, filesystem: bool = False
) -> tuple[Config | None, list[Problem]]:
    """As :func:`parse_config`, for text said to come from ``source`` (relative paths
    resolve against ``source``'s folder)."""
    source = Path(os.path.abspath(source))
    data, lines, problems = load_yaml(text, source)
    if problems:
        return None, problems
    parser = _Parser(source, lines)
    parser.running = running
    parser.filesystem = filesystem
    parser.problems.extend(duplicate_key_problems(source, lines))
    config = parser.parse(data)
    # in file order; problems found across sections (overlaps) slot in by line
    problems = sorted(parser.problems, key=lambda p: p.line or 0)
    if any(p.is_error for p in problems):
        return None, problems
    assert config is not None
    return config, problems


class _Parser(InboxSections, AlertsSection, OverlapChecks):
    """The whole file: the top level, the registry, archives, audits and logs."""

    running: Config | None = None  # a running daemon's, when it reloads the file

    def parse(self, data: object) -> Config | None:
        top = self.mapping(data, (), "settings (key: value lines)")
        if top is None:
            return None
        self.check_keys(top, (), "")
        base = self.base

        registry = self.get(top, (), "registry", self._registry, EMBEDDED)
        registry_url = self.get(top, (), "registry_url", self._registry_url, None)
        if registry_url is not None and registry != EMBEDDED and registry_url != registry:
            self.error(
                ("registry_url",),
                "only applies to 'registry: embedded' (the URL the embedded registry is "
                "served at); with a django-neurobank registry, identifiers resolve under "
                "'registry'",
            )
        registry_aliases = self.get(top, (), "registry_aliases", self._registry_aliases, ())
        registry_auth = self.get(
            top, (), "registry_auth", lambda v: None if v is None else path_in(base)(v), None
        )
        state_dir = self.get(top, (), "state_dir", path_in(base), DEFAULT_STATE_DIR)
        control_socket = self.get(top, (), "control_socket", path_in(base), DEFAULT_CONTROL_SOCKET)
        state_dirs: list[tuple[KeyPath, Path]] = [(("state_dir",), state_dir)]
        if self.running is not None:
            if self.running.state_dir != state_dir:
                state_dirs.append((("state_dir",), self.running.state_dir))
            state_dir = self._kept("state_dir", state_dir, self.running.state_dir)
            control_socket = self._kept(
                "control_socket", control_socket, self.running.control_socket
            )
        control = self._control(top)
        datatypes = self._datatypes(top)
        archives, failed_refs = self._archives(top)
        inboxes = self._inboxes(top, archives, failed_refs)
        audit = self._audit(top)
        log = self._log(top)
        metrics = self._metrics(top, base)
        alerts = self._alerts(top, base)
        files = daemon_files(registry_auth, control_socket, metrics, alerts)
        self._check_overlaps(archives, inboxes, state_dirs, files)

        if any(p.is_error for p in self.problems):
            return None
        return Config(
            source=self.source,
            registry=registry,
            registry_url=registry_url,
            registry_aliases=registry_aliases,
            registry_auth=registry_auth,
            state_dir=state_dir,
            control_socket=control_socket,
            control=control,
            datatypes=datatypes,
            archives=tuple(a for _, a in archives),
            inboxes=tuple(i for _, i in inboxes),
            audit=audit,
            log=log,
            metrics=metrics,
            alerts=alerts,
            warnings=tuple(self.problems),
        )

    def _kept(self, key: str, written: Path, running: Path) -> Path:
        """What a reload keeps of a setting that changes only at restart."""
        if written != running:
            self.warn(
                (key,),
                f"changed to {written}, which takes effect at the next restart; until then "
                f"the daemon keeps {running}",
                hint="restart nbankd (systemctl restart nbankd) to use it",
            )
        return running

    def _registry(self, value: object) -> str:
        what = (
            "must be 'embedded' or the URL of a django-neurobank registry (https://host/neurobank/)"
        )
        if not isinstance(value, str) or not value.strip():
            bad(f"{what}, not {describe(value)}")
        if value.strip().lower() == EMBEDDED:
            return EMBEDDED
        url = http_url(value, what=what)
        parts = urlsplit(url)
        if not parts.path.endswith("/neurobank/"):
            self.warn(
                ("registry",),
                f"{url} does not end with /neurobank/, where django-neurobank is usually "
                "served; `nbankd check-config` tells whether it answers",
            )
        if parts.scheme == "http" and not is_local_host(parts.hostname or ""):
            self.warn(
                ("registry",),
                "plain http: credentials would cross the network unencrypted; prefer https",
            )
        return url

    def _registry_url(self, value: object) -> str | None:
        if value is None:
            return None
        what = "must be the http(s) URL the embedded registry is served at"
        if not isinstance(value, str) or not value.strip():
            bad(f"{what}, not {describe(value)}")
        return http_url(value, what=what)

    def _registry_aliases(self, value: object) -> tuple[str, ...]:
        what = "must be a list of the registry's other URLs (as archives' nbank.json name it)"
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            bad(f"{what}, not {describe(value)}")
        return tuple(value)

    def _control(self, top: dict[str, Any]) -> ControlConfig:
        if "control" not in top:
            return ControlConfig()
        section = self.mapping(top["control"], ("control",), "readers and admins")
        if section is None:
            return ControlConfig()
        path: KeyPath = ("control",)
        self.check_keys(section, path, "control")
        default = ControlConfig()
        return ControlConfig(
            readers=self.get(section, path, "readers", check_names, default.readers),
            admins=self.get(section, path, "admins", check_names, default.admins),
        )

    def _datatypes(self, top: dict[str, Any]) -> Mapping[str, str]:
        raw = self.collection(top, (), "datatypes")
        out: dict[str, str] = {}
        if raw is MISSING:
            return MappingProxyType(out)
        section = self.mapping(raw, ("datatypes",), "datatype names to content types")
        if section is None:
            return MappingProxyType(out)
        name_check = slug("datatype name", DATATYPE_NAME_MAX)
        for name, content_type in section.items():
            path: KeyPath = ("datatypes", str(name))
            try:
                name_check(name)
            except Bad as err:
                self.error(path, err.message, err.hint)
                continue
            if content_type is None or content_type == "":
                content_type = DEFAULT_CONTENT_TYPE
            if not isinstance(content_type, str) or not content_type.strip():
                self.error(path, f"content type must be text, not {describe(content_type)}")
                continue
            if len(content_type) > CONTENT_TYPE_MAX:
                self.error(path, f"content type is longer than {CONTENT_TYPE_MAX} characters")
                continue
            out[name] = content_type.strip()
        return MappingProxyType(out)

    def _archives(self, top: dict[str, Any]) -> tuple[list[tuple[int, ArchiveConfig]], set[str]]:
        """Valid archives with their index, and names/paths of entries that failed."""
        raw = self.collection(top, (), "archives")
        archives: list[tuple[int, ArchiveConfig]] = []
        failed: set[str] = set()
        if raw is MISSING:
            return archives, failed
        if not isinstance(raw, list):
            self.error(("archives",), f"must be a list of archives, not {describe(raw)}")
            return archives, failed
        self.archive_entries = len(raw)
        by_name: dict[str, int] = {}
        by_path: dict[Path, int] = {}
        for index, entry in enumerate(raw):
            path: KeyPath = ("archives", index)
            archive = self._archive(entry, path, failed)
            if archive is None:
                continue
            if archive.name in by_name:
                self.error(
                    (*path, "name"),
                    f"archive name {archive.name!r} is already used by "
                    f"archives[{by_name[archive.name]}]",
                    hint="give one of them another 'name'",
                )
                continue
            if archive.path in by_path:
                self.error(
                    (*path, "path"),
                    f"{archive.path} is already configured as archives[{by_path[archive.path]}]",
                )
                continue
            by_name[archive.name] = index
            by_path[archive.path] = index
            archives.append((index, archive))
        return archives, failed

    def _archive(self, entry: object, path: KeyPath, failed: set[str]) -> ArchiveConfig | None:
        section = self.mapping(entry, path, "archive settings (path, name, create)")
        if section is None:
            return None
        self.check_keys(section, path, "archives[]")
        before = len(self.problems)
        if "path" not in section:
            self.error((*path, "path"), "is required: the folder of the neurobank archive")
        folder = self.get(section, path, "path", path_in(self.base), None)
        if isinstance(section.get("name"), str):
            failed.add(section["name"])
        if folder is not None:
            failed.add(str(folder))
            if len(str(folder)) > ARCHIVE_ROOT_MAX:
                self.error((*path, "path"), f"is longer than {ARCHIVE_ROOT_MAX} characters")
        name: str | None = None
        if section.get("name") is not None:
            name = self.get(section, path, "name", slug("archive name", ARCHIVE_NAME_MAX), None)
        elif folder is not None:
            try:
                name = slug("the folder name", ARCHIVE_NAME_MAX)(folder.name)
            except Bad as err:
                self.error(
                    (*path, "name"),
                    f"is not set and {err.message}",
                    hint="set 'name' to the archive's registry name",
                )
        create = self.get(section, path, "create", check_bool, False)
        if len(self.problems) > before or folder is None or name is None:
            return None
        failed.discard(name)
        failed.discard(str(folder))
        return ArchiveConfig(path=folder, name=name, create=create)

    def _audit(self, top: dict[str, Any]) -> AuditConfig:
        default = AuditConfig()
        if "audit" not in top:
            return default
        path: KeyPath = ("audit",)
        section = self.mapping(top["audit"], path, "audit settings (every, scrub_days, ...)")
        if section is None:
            return default
        self.check_keys(section, path, "audit")
        audit = AuditConfig(
            every=self.get(section, path, "every", duration(positive=True), default.every),
            scrub_days=self.get(section, path, "scrub_days", check_count, default.scrub_days),
            max_mb_per_s=self.get(section, path, "max_mb_per_s", number(), default.max_mb_per_s),
            workers=self.get(section, path, "workers", audit_workers, default.workers),
        )
        if audit.scrub_days and audit.scrub_days * 86400 < audit.every:
            self.warn(
                (*path, "scrub_days"),
                f"{audit.scrub_days} day(s) is shorter than audit.every"
                f" ({format_duration(audit.every)}): every audit re-reads every resource",
                "set scrub_days to a multiple of every, or every shorter",
            )
        return audit

    def _log(self, top: dict[str, Any]) -> LogConfig:
        default = LogConfig()
        if "log" not in top:
            return default
        path: KeyPath = ("log",)
        section = self.mapping(top["log"], path, "log settings (format, level)")
        if section is None:
            return default
        self.check_keys(section, path, "log")
        return LogConfig(
            format=cast(
                LogFormat, self.get(section, path, "format", enum(LOG_FORMAT_VALUES), "auto")
            ),
            level=cast(LogLevel, self.get(section, path, "level", enum(LOG_LEVEL_VALUES), "info")),
        )

    def _metrics(self, top: dict[str, Any], base: Path) -> MetricsConfig:
        default = MetricsConfig()
        if "metrics" not in top:
            return default
        path: KeyPath = ("metrics",)
        section = self.mapping(top["metrics"], path, "metrics settings (listen, textfile)")
        if section is None:
            return default
        self.check_keys(section, path, "metrics")
        return MetricsConfig(
            listen=self.get(section, path, "listen", listen_address, None),
            textfile=self.get(section, path, "textfile", path_in(base), None),
            textfile_every=self.get(
                section, path, "textfile_every", duration(positive=True), default.textfile_every
            ),
        )
