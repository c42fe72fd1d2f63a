"""Parsing the ``inboxes`` section: each inbox's folder, archive, datatypes,
metadata, settling, watching, placement and rejected folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from nbankd.config.durations import format_duration
from nbankd.config.model import (
    DEFAULT_IGNORE,
    DIRECTORIES_VALUES,
    FILE_METADATA_VALUES,
    PLACEMENT_VALUES,
    READY_VALUES,
    WATCH_VALUES,
    WORK_DIR_NAME,
    ArchiveConfig,
    Directories,
    FileMetadata,
    InboxConfig,
    Placement,
    Ready,
    Watch,
)
from nbankd.config.parsing import (
    EXTENSION_RE,
    MISSING,
    ParserBase,
)
from nbankd.config.values import (
    Bad,
    KeyPath,
    check_bool,
    check_json_value,
    check_optional_bool,
    check_patterns,
    check_regex,
    describe,
    duration,
    enum,
    expand_path,
    path_in,
    render_key,
    slug,
    suggest,
    within,
)
from nbankd.registry.base import DATATYPE_NAME_MAX
from nbankd.yamlnumbers import number_reading


class InboxSections(ParserBase):
    """The ``inboxes`` section."""

    def _inboxes(
        self,
        top: dict[str, Any],
        archives: list[tuple[int, ArchiveConfig]],
        failed_refs: set[str],
    ) -> list[tuple[int, InboxConfig]]:
        raw = self.collection(top, (), "inboxes")
        inboxes: list[tuple[int, InboxConfig]] = []
        if raw is MISSING:
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
            file_metadata=cast(
                FileMetadata,
                self.get(section, path, "file_metadata", enum(FILE_METADATA_VALUES), "read"),
            ),
            rejected_dir=defaults.rejected_dir,
            expect_every=self.get(section, path, "expect_every", duration(positive=True), None),
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
        if raw is MISSING:
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
            if not EXTENSION_RE.match(normal):
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
        if raw is MISSING:
            return MappingProxyType(out)
        key_path = (*path, "metadata")
        mapping = self.mapping(raw, key_path, "metadata keys to values")
        if mapping is None:
            return MappingProxyType(out)
        for key, value in mapping.items():
            if not isinstance(key, str) or not key:
                self.error(key_path, f"metadata key {key!r} must be text")
                continue
            odd = self._odd_number((*key_path, key))
            if odd:
                self.error((*key_path, key), *odd)
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

    def _odd_number(self, key_path: KeyPath) -> tuple[str, str] | None:
        """(message, hint) when a value at or under ``key_path`` is written as a number
        YAML 1.1 reads otherwise than it looks (0417 octal, 1:30 base 60, 12_34)."""
        size = len(key_path)
        for where, (text, value) in self.lines.numbers.items():
            if where[:size] != key_path:
                continue
            inner = render_key(where[size:]).lstrip(".")
            at = f"{inner}: " if inner else ""
            return (
                f"{at}{text} is not a plain decimal number: YAML reads it as "
                f"{number_reading(text)} ({value!r})",
                f"quote it ('{text}') to keep it as written, or write the number in plain decimal",
            )
        return None
