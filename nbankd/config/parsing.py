"""The parser's ground floor: YAML read with the line of every key, the keys
each section accepts (derived from the typed records), and the helpers every section
parser uses to read a value and report a problem with its file, line and key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nbankd.config.model import (
    AlertsConfig,
    ArchiveConfig,
    AuditConfig,
    Config,
    ControlConfig,
    EmailConfig,
    InboxConfig,
    LogConfig,
    MetricsConfig,
    Problem,
    WebhookConfig,
    config_keys,
)
from nbankd.config.values import (
    Bad,
    KeyPath,
    bad,
    describe,
    render_key,
    suggest,
)
from nbankd.config.yamlread import Lines, duplicate_key_problems, load_yaml

__all__ = [
    "ACCEPTED_KEYS",
    "ARCHIVE_ROOT_MAX",
    "CONTENT_TYPE_MAX",
    "EXTENSION_RE",
    "MISSING",
    "Lines",
    "ParserBase",
    "audit_workers",
    "duplicate_key_problems",
    "load_yaml",
]

T = TypeVar("T")

#: every key the parser accepts, by section ("archives[]": keys of one archive entry),
#: derived from the typed records the sections become
ACCEPTED_KEYS: dict[str, tuple[str, ...]] = {
    "": config_keys(Config),
    "control": config_keys(ControlConfig),
    "archives[]": config_keys(ArchiveConfig),
    "inboxes[]": config_keys(InboxConfig),
    "audit": config_keys(AuditConfig),
    "log": config_keys(LogConfig),
    "metrics": config_keys(MetricsConfig),
    "alerts": config_keys(AlertsConfig),
    "alerts.webhook": config_keys(WebhookConfig),
    "alerts.email": config_keys(EmailConfig),
}

ARCHIVE_ROOT_MAX = 512  # django-neurobank's Archive.root max_length
CONTENT_TYPE_MAX = 128
EXTENSION_RE = re.compile(r"^\.[^./\\\s]+$")
MISSING: Any = object()


def audit_workers(value: object) -> int:
    """``audit.workers``: a whole number of reading threads from 1 to 64, or ``auto`` (0)."""
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        bad(f"must be 'auto' or a whole number from 1 to 64, not {describe(value)}")
    return value


# --- the parser's helpers -----------------------------------------------------------


class ParserBase:
    """Reading values and reporting problems, for every section parser."""

    def __init__(self, source: Path, lines: Lines) -> None:
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
        """A list/mapping key where null means empty; MISSING when absent."""
        value = mapping.get(key, MISSING)
        return MISSING if value is None else value

    # sections
