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

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from nbankd.config.durations import format_duration
from nbankd.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTENT_TYPE,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_IGNORE,
    DEFAULT_STATE_DIR,
    DIRECTORIES_VALUES,
    EMBEDDED,
    LOG_FORMAT_VALUES,
    LOG_LEVEL_VALUES,
    PLACEMENT_VALUES,
    READY_VALUES,
    WATCH_VALUES,
    WORK_DIR_NAME,
    ArchiveConfig,
    AuditConfig,
    Config,
    ControlConfig,
    Directories,
    InboxConfig,
    InvalidConfig,
    LogConfig,
    LogFormat,
    LogLevel,
    Placement,
    Problem,
    Ready,
    Watch,
)
from nbankd.config.values import (
    Bad,
    KeyPath,
    bad,
    check_bool,
    check_count,
    check_json_value,
    check_names,
    check_optional_bool,
    check_patterns,
    check_regex,
    describe,
    duration,
    enum,
    expand_path,
    http_url,
    is_local_host,
    number,
    path_in,
    render_key,
    slug,
    suggest,
    within,
)
from nbankd.registry.base import ARCHIVE_NAME_MAX, DATATYPE_NAME_MAX

__all__ = [
    "ACCEPTED_KEYS",
    "find_config_path",
    "load_config",
    "parse_config",
    "parse_config_text",
]

T = TypeVar("T")

#: every key the parser accepts, by section ("archives[]": keys of one archive entry)
ACCEPTED_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "registry",
        "registry_url",
        "registry_aliases",
        "registry_auth",
        "state_dir",
        "control_socket",
        "control",
        "datatypes",
        "archives",
        "inboxes",
        "audit",
        "log",
    ),
    "control": ("readers", "admins"),
    "archives[]": ("path", "name", "create"),
    "inboxes[]": (
        "path",
        "archive",
        "dtype",
        "dtype_by_extension",
        "metadata",
        "path_metadata",
        "auto_id",
        "recursive",
        "settle_seconds",
        "ready",
        "watch",
        "ignore",
        "stall_after",
        "rescan_every",
        "watch_check_every",
        "fallback_poll_every",
        "placement",
        "verify",
        "directories",
        "rejected_dir",
    ),
    "audit": ("every", "scrub_days", "max_mb_per_s", "workers"),
    "log": ("format", "level"),
}

ARCHIVE_ROOT_MAX = 512  # django-neurobank's Archive.root max_length
CONTENT_TYPE_MAX = 128
_EXTENSION_RE = re.compile(r"^\.[^./\\\s]+$")
_MISSING: Any = object()


def _audit_workers(value: object) -> int:
    """``audit.workers``: a whole number of reading threads from 1 to 64, or ``auto`` (0)."""
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        bad(f"must be 'auto' or a whole number from 1 to 64, not {describe(value)}")
    return value


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


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parses the file; raises :class:`~.model.InvalidConfig` (a ConfigError) listing
    every error. Warnings are kept in ``Config.warnings``."""
    source = Path(os.path.abspath(os.path.expanduser(path)))
    config, problems = parse_config(source)
    if config is None:
        raise InvalidConfig(source, problems)
    return config


def parse_config(path: str | os.PathLike[str]) -> tuple[Config | None, list[Problem]]:
    """Every problem (errors and warnings) of the file, and the Config when there is no error."""
    source = Path(os.path.abspath(os.path.expanduser(path)))
    try:
        raw = source.read_bytes()
    except OSError as err:
        reason = err.strerror or str(err)
        hint = f"give another file with -c FILE or ${CONFIG_ENV}"
        if isinstance(err, IsADirectoryError):
            reason = "is a folder, not a file"
        message = f"cannot read the configuration file: {reason}"
        return None, [Problem(source, "", message, hint=hint)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [Problem(source, "", f"is not UTF-8 text (byte {err.start})")]
    return parse_config_text(text, source)


def parse_config_text(text: str, source: Path) -> tuple[Config | None, list[Problem]]:
    """As :func:`parse_config`, for text said to come from ``source`` (relative paths
    resolve against ``source``'s folder)."""
    source = Path(os.path.abspath(source))
    data, lines, problems = _load_yaml(text, source)
    if problems:
        return None, problems
    parser = _Parser(source, lines)
    parser.problems.extend(_duplicate_key_problems(source, lines))
    config = parser.parse(data)
    # in file order; problems found across sections (overlaps) slot in by line
    problems = sorted(parser.problems, key=lambda p: p.line or 0)
    if any(p.is_error for p in problems):
        return None, problems
    assert config is not None
    return config, problems


# --- YAML with line numbers ----------------------------------------------------------


@dataclass
class _Lines:
    """Line numbers (1-based) of key paths, and keys given twice in one mapping."""

    of: dict[KeyPath, int] = field(default_factory=dict)
    duplicates: list[tuple[KeyPath, int, int]] = field(default_factory=list)


def _load_yaml(text: str, source: Path) -> tuple[Any, _Lines, list[Problem]]:
    lines = _Lines()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            msg = "the file is empty; it needs a mapping of settings (at least 'registry:')"
            return None, lines, [Problem(source, "", msg)]
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        where = f" at line {line}, column {mark.column + 1}" if mark is not None else ""
        message = f"YAML syntax error{where}: {err.problem or err.context or 'invalid YAML'}"
        if err.context and err.problem and err.context_mark is not None:
            message += f" ({err.context} at line {err.context_mark.line + 1})"
        return None, lines, [Problem(source, "", message, line=line)]
    except yaml.YAMLError as err:  # pragma: no cover - PyYAML marks nearly everything
        return None, lines, [Problem(source, "", f"YAML error: {err}")]
    finally:
        loader.dispose()
    _walk(node, (), lines)
    return data, lines, []


def _walk(node: yaml.Node, path: KeyPath, lines: _Lines) -> None:
    lines.of.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                lines.duplicates.append(((*path, key), seen[key], line))
            seen[key] = line
            lines.of[(*path, key)] = line
            _walk(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines)


def _duplicate_key_problems(source: Path, lines: _Lines) -> list[Problem]:
    return [
        Problem(
            source,
            render_key(path),
            f"is given twice (lines {first} and {second}); remove one",
            line=second,
        )
        for path, first, second in lines.duplicates
    ]


# --- the parser ----------------------------------------------------------------------


class _Parser:
    def __init__(self, source: Path, lines: _Lines) -> None:
        self.source = source
        self.base = source.parent
        self.lines = lines
        self.problems: list[Problem] = []
        self.archive_entries = 0  # entries under 'archives', valid or not

    # reporting
    def _line(self, path: KeyPath) -> int | None:
        while True:
            if path in self.lines.of:
                return self.lines.of[path]
            if not path:
                return None
            path = path[:-1]

    def error(self, path: KeyPath, message: str, hint: str = "") -> None:
        self.problems.append(
            Problem(self.source, render_key(path), message, self._line(path), "error", hint)
        )

    def warn(self, path: KeyPath, message: str, hint: str = "") -> None:
        self.problems.append(
            Problem(self.source, render_key(path), message, self._line(path), "warning", hint)
        )

    # structure
    def mapping(self, value: object, path: KeyPath, what: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping of {what}, not {describe(value)}")
            return None
        return value

    def check_keys(self, mapping: dict[Any, Any], path: KeyPath, section: str) -> None:
        allowed = ACCEPTED_KEYS[section]
        for key in mapping:
            if not isinstance(key, str):
                self.error(path, f"key {key!r} must be text")
            elif key not in allowed:
                self.error((*path, key), f"unknown key{suggest(key, allowed)}")

    def get(
        self,
        mapping: dict[str, Any],
        path: KeyPath,
        key: str,
        check: Callable[[object], T],
        default: T,
    ) -> T:
        if key not in mapping:
            return default
        try:
            return check(mapping[key])
        except Bad as err:
            self.error((*path, key), err.message, err.hint)
            return default

    def collection(self, mapping: dict[str, Any], path: KeyPath, key: str) -> Any:
        """A list/mapping key where null means empty; _MISSING when absent."""
        value = mapping.get(key, _MISSING)
        return _MISSING if value is None else value

    # sections
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
        control = self._control(top)
        datatypes = self._datatypes(top)
        archives, failed_refs = self._archives(top)
        inboxes = self._inboxes(top, archives, failed_refs)
        audit = self._audit(top)
        log = self._log(top)
        self._check_overlaps(archives, inboxes, state_dir, control_socket)

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
            warnings=tuple(self.problems),
        )

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
        if raw is _MISSING:
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
        if raw is _MISSING:
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

    def _inboxes(
        self,
        top: dict[str, Any],
        archives: list[tuple[int, ArchiveConfig]],
        failed_refs: set[str],
    ) -> list[tuple[int, InboxConfig]]:
        raw = self.collection(top, (), "inboxes")
        inboxes: list[tuple[int, InboxConfig]] = []
        if raw is _MISSING:
            return inboxes
        if not isinstance(raw, list):
            self.error(("inboxes",), f"must be a list of inboxes, not {describe(raw)}")
            return inboxes
        for index, entry in enumerate(raw):
            inbox = self._inbox(entry, ("inboxes", index), archives, failed_refs)
            if inbox is not None:
                inboxes.append((index, inbox))
        return inboxes

    def _inbox_archive(
        self,
        section: dict[str, Any],
        path: KeyPath,
        archives: list[tuple[int, ArchiveConfig]],
        failed_refs: set[str],
    ) -> str | None:
        key_path = (*path, "archive")
        names = [a.name for _, a in archives]
        if section.get("archive") is None:
            if self.archive_entries == 0:
                self.error(key_path, "is required, and no archive is configured under 'archives'")
            elif self.archive_entries > 1:
                self.error(
                    key_path,
                    "is required when several archives are configured: give the name or "
                    "path of one",
                    hint=f"archives configured: {', '.join(names) or 'none valid'}",
                )
            elif archives:
                return archives[0][1].name
            return None  # the one archive's entry has errors, reported there
        ref = section["archive"]
        if not isinstance(ref, str) or not ref.strip():
            self.error(key_path, f"must be an archive's name or path, not {describe(ref)}")
            return None
        ref = ref.strip()
        for _, archive in archives:
            if archive.name == ref:
                return archive.name
        try:
            as_path = expand_path(ref, self.base)
        except Bad:
            as_path = None
        for _, archive in archives:
            if archive.path == as_path:
                return archive.name
        if ref in failed_refs or str(as_path) in failed_refs:
            return None  # that archive's entry already has an error
        listing = ", ".join(names) if names else "none"
        self.error(
            key_path,
            f"no configured archive is named or located at {ref!r}{suggest(ref, names)}",
            hint=f"archives configured: {listing}",
        )
        return None

    def _inbox(
        self,
        entry: object,
        path: KeyPath,
        archives: list[tuple[int, ArchiveConfig]],
        failed_refs: set[str],
    ) -> InboxConfig | None:
        section = self.mapping(entry, path, "inbox settings (path, archive, dtype, ...)")
        if section is None:
            return None
        self.check_keys(section, path, "inboxes[]")
        defaults = InboxConfig(path=Path("/"), archive="")
        if "path" not in section:
            self.error((*path, "path"), "is required: the folder to watch")
        folder = self.get(section, path, "path", path_in(self.base), None)
        archive = self._inbox_archive(section, path, archives, failed_refs)
        dtype = self.get(
            section,
            path,
            "dtype",
            lambda v: None if v is None else slug("datatype", DATATYPE_NAME_MAX)(v),
            None,
        )
        by_extension = self._dtype_by_extension(section, path)
        if section.get("dtype") is None and not section.get("dtype_by_extension"):
            self.error(
                (*path, "dtype"),
                "is required (the datatype of deposited files) unless dtype_by_extension is given",
                hint="a sidecar NAME.nbank.yaml can still override it per file",
            )
        metadata = self._metadata(section, path)
        path_metadata = self.get(section, path, "path_metadata", check_regex, None)
        settle = self.get(
            section, path, "settle_seconds", duration(positive=False), defaults.settle_seconds
        )
        stall_after = self.get(
            section, path, "stall_after", duration(positive=True), defaults.stall_after
        )
        if stall_after <= settle:
            if "stall_after" in section:
                self.error(
                    (*path, "stall_after"),
                    f"must be longer than settle_seconds ({settle:g}s), "
                    "or every file would be reported as stalled",
                )
            else:
                self.error(
                    (*path, "settle_seconds"),
                    f"must be shorter than stall_after ({format_duration(stall_after)}), "
                    "or every file would be reported as stalled",
                    hint="raise stall_after too",
                )
        verify = self.get(section, path, "verify", check_bool, defaults.verify)
        if not verify:
            self.warn(
                (*path, "verify"),
                "is false: archive copies are not read back from storage and checked against "
                "their SHA-1 before the source is removed; a bad write could lose data",
            )
        inbox = InboxConfig(
            path=folder if folder is not None else Path("/"),
            archive=archive or "",
            dtype=dtype,
            dtype_by_extension=by_extension,
            metadata=metadata,
            path_metadata=path_metadata,
            auto_id=self.get(section, path, "auto_id", check_optional_bool, None),
            recursive=self.get(section, path, "recursive", check_bool, defaults.recursive),
            settle_seconds=settle,
            ready=cast(Ready, self.get(section, path, "ready", enum(READY_VALUES), "settle")),
            watch=cast(Watch, self.get(section, path, "watch", enum(WATCH_VALUES), "auto")),
            ignore=self.get(section, path, "ignore", check_patterns, DEFAULT_IGNORE),
            stall_after=stall_after,
            rescan_every=self.get(
                section, path, "rescan_every", duration(positive=True), defaults.rescan_every
            ),
            watch_check_every=self.get(
                section,
                path,
                "watch_check_every",
                duration(positive=True),
                defaults.watch_check_every,
            ),
            fallback_poll_every=self.get(
                section,
                path,
                "fallback_poll_every",
                duration(positive=True),
                defaults.fallback_poll_every,
            ),
            placement=cast(
                Placement, self.get(section, path, "placement", enum(PLACEMENT_VALUES), "copy")
            ),
            verify=verify,
            directories=cast(
                Directories,
                self.get(section, path, "directories", enum(DIRECTORIES_VALUES), "files"),
            ),
            rejected_dir=defaults.rejected_dir,
        )
        if folder is not None:
            rejected = self._rejected_dir(section, path, folder)
            if rejected is not None:
                inbox = replace(inbox, rejected_dir=rejected)
        # an inbox with other bad values still takes part in the overlap checks
        # (no Config is built when there is any error, so placeholders never leak)
        return inbox if folder is not None else None

    def _rejected_dir(self, section: dict[str, Any], path: KeyPath, folder: Path) -> str | None:
        if "rejected_dir" not in section:
            return None
        key_path = (*path, "rejected_dir")
        value = section["rejected_dir"]
        if not isinstance(value, str) or not value.strip():
            self.error(key_path, f"must be a folder inside the inbox, not {describe(value)}")
            return None
        target = Path(os.path.normpath(os.path.join(folder, value.strip())))
        if target == folder or folder not in target.parents:
            self.error(
                key_path,
                f"{value!r} is not inside the inbox {folder}",
                hint="give a folder name relative to the inbox, such as 'rejected'",
            )
            return None
        if within(target, folder / WORK_DIR_NAME):
            self.error(key_path, f"must not be inside the daemon's work folder {WORK_DIR_NAME}/")
            return None
        return os.path.relpath(target, folder)

    def _dtype_by_extension(self, section: dict[str, Any], path: KeyPath) -> Mapping[str, str]:
        out: dict[str, str] = {}
        raw = self.collection(section, path, "dtype_by_extension")
        if raw is _MISSING:
            return MappingProxyType(out)
        key_path = (*path, "dtype_by_extension")
        mapping = self.mapping(raw, key_path, "file extensions to datatypes ({.wav: my-dtype})")
        if mapping is None:
            return MappingProxyType(out)
        check_dtype = slug("datatype", DATATYPE_NAME_MAX)
        for ext, dtype in mapping.items():
            item_path = (*key_path, str(ext))
            if not isinstance(ext, str) or not ext.strip():
                self.error(item_path, "the extension must be text such as '.wav'")
                continue
            normal = ext.strip().lower()
            if not normal.startswith("."):
                normal = "." + normal
            if not _EXTENSION_RE.match(normal):
                self.error(
                    item_path,
                    f"{ext!r} is not a single file extension such as '.wav' "
                    "(files are matched on their last suffix)",
                )
                continue
            if normal in out:
                self.error(item_path, f"extension {normal} is given twice (case is ignored)")
                continue
            try:
                out[normal] = check_dtype(dtype)
            except Bad as err:
                self.error(item_path, err.message, err.hint)
        return MappingProxyType(out)

    def _metadata(self, section: dict[str, Any], path: KeyPath) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        raw = self.collection(section, path, "metadata")
        if raw is _MISSING:
            return MappingProxyType(out)
        key_path = (*path, "metadata")
        mapping = self.mapping(raw, key_path, "metadata keys to values")
        if mapping is None:
            return MappingProxyType(out)
        for key, value in mapping.items():
            if not isinstance(key, str) or not key:
                self.error(key_path, f"metadata key {key!r} must be text")
                continue
            try:
                out[key] = check_json_value(value)
            except Bad as err:
                self.error((*key_path, key), err.message, err.hint)
        try:
            json.dumps(out)
        except (TypeError, ValueError) as err:  # pragma: no cover - checked above
            self.error(key_path, f"cannot be stored as JSON: {err}")
        return MappingProxyType(out)

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
            workers=self.get(section, path, "workers", _audit_workers, default.workers),
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

    def _check_overlaps(
        self,
        archives: list[tuple[int, ArchiveConfig]],
        inboxes: list[tuple[int, InboxConfig]],
        state_dir: Path,
        control_socket: Path,
    ) -> None:
        for n, (i, a) in enumerate(archives):
            for j, b in archives[n + 1 :]:
                if within(b.path, a.path) or within(a.path, b.path):
                    self.error(
                        ("archives", j, "path"),
                        f"{b.path} overlaps archive {a.name!r} at {a.path} (archives[{i}]); "
                        "archives must not be nested",
                    )
        for n, (i, inbox) in enumerate(inboxes):
            for k, archive in archives:
                if within(inbox.path, archive.path):
                    self.error(
                        ("inboxes", i, "path"),
                        f"{inbox.path} is inside archive {archive.name!r} ({archive.path}, "
                        f"archives[{k}])",
                        hint="keep inboxes outside archive folders",
                    )
                elif within(archive.path, inbox.path):
                    self.error(
                        ("inboxes", i, "path"),
                        f"{inbox.path} contains archive {archive.name!r} ({archive.path}, "
                        f"archives[{k}]); the daemon would deposit its own archive",
                        hint="keep archive folders outside inboxes",
                    )
            for j, other in inboxes[n + 1 :]:
                if within(other.path, inbox.path) or within(inbox.path, other.path):
                    self.error(
                        ("inboxes", j, "path"),
                        f"{other.path} overlaps inboxes[{i}] ({inbox.path}); "
                        "one inbox must not be inside another",
                    )
        for key, target in (("state_dir", state_dir), ("control_socket", control_socket)):
            for i, inbox in inboxes:
                if within(target, inbox.path):
                    self.error(
                        (key,), f"{target} is inside inboxes[{i}] ({inbox.path}); move it out"
                    )
            for _, archive in archives:
                if within(target, archive.path):
                    self.error(
                        (key,),
                        f"{target} is inside archive {archive.name!r} ({archive.path}); "
                        "move it out",
                    )
