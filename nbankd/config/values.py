"""Checks of single values for the loader: each returns the clean value or raises
:class:`Bad` with the reason (and a hint); the loader attaches file, line and key."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from nbankd.config.durations import format_duration, parse_duration
from nbankd.registry.base import SLUG_RE

KeyPath = tuple[str | int, ...]  # a key path: ("inboxes", 1, "settle_seconds")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


# --- key paths and values ------------------------------------------------------------


def render_key(path: KeyPath) -> str:
    """("inboxes", 1, "settle_seconds") -> "inboxes[1].settle_seconds"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def describe(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text}" if len(text) <= 40 else f"a number of {len(text)} digits"
    if isinstance(value, str):
        return f"the text {value!r}" if len(value) < 60 else "a long text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Bad(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def bad(message: str, hint: str = "") -> NoReturn:
    raise Bad(message, hint)


def check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        bad(f"must be true or false, not {describe(value)}")
    return value


def check_optional_bool(value: object) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        bad(f"must be true, false or null, not {describe(value)}")
    return value


def enum(values: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in values:
            return value.strip().lower()
        suggestion = suggest(value, values) if isinstance(value, str) else ""
        bad(f"must be one of {', '.join(values)}, not {describe(value)}{suggestion}")

    return check


def slug(kind: str, max_length: int) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or not value:
            bad(f"{kind} must be text, not {describe(value)}")
        if not SLUG_RE.match(value):
            bad(f"{kind} {value!r} is not a registry name: use only letters, digits, '-' and '_'")
        if len(value) > max_length:
            bad(f"{kind} {value!r} is longer than {max_length} characters")
        return value

    return check


#: the longest duration a setting takes: 100 years (timers past about 292 years
#: overflow the clock's arithmetic)
MAX_DURATION = 36500 * 86400.0
#: the largest count (``audit.scrub_days``): 100 years of days
MAX_COUNT = 36500


def duration(*, positive: bool) -> Callable[[object], float]:
    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            bad(str(err) if value is not None else "is empty; " + str(err))
        if positive and seconds == 0:
            bad("must be longer than zero")
        if seconds > MAX_DURATION:
            bad(
                f"must be at most {format_duration(MAX_DURATION)} (100 years), "
                f"not {describe(value)}",
                hint="leave the setting out for its default",
            )
        return seconds

    return check


def number(*, minimum: float = 0.0) -> Callable[[object], float]:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            bad(f"must be a number, not {describe(value)}")
        try:
            as_float = float(value)
        except OverflowError:
            bad("is too large a number")
        if not math.isfinite(as_float):
            bad("must be a finite number")
        if as_float < minimum:
            bad(f"must not be negative, got {value!r}" if minimum == 0 else f"must be ≥ {minimum}")
        return as_float

    return check


def check_count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        bad(f"must be a whole number, not {describe(value)}")
    if value < 0:
        bad(f"must not be negative, got {value}")
    if value > MAX_COUNT:
        bad(f"must be at most {MAX_COUNT}, not {describe(value)}")
    return value


def check_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        bad(f"must be a list of user or group names, not {describe(value)}")
    names = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            bad(f"item {index} must be a user or group name (text), not {describe(item)}")
        names.append(item.strip())
    return tuple(names)


def check_patterns(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        bad(f"must be a list of glob patterns such as ['*.tmp', '.*'], not {describe(value)}")
    patterns = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            bad(f"item {index} must be a glob pattern (text), not {describe(item)}")
        patterns.append(item)
    return tuple(patterns)


def check_regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        bad(f"must be a regular expression (text), not {describe(value)}")
    try:
        pattern = re.compile(value)
    except re.error as err:
        bad(f"is not a valid regular expression: {err.msg} at position {err.pos}")
    if not pattern.groupindex:
        bad(
            "has no named group; write (?P<name>...) for each metadata key to take "
            "from the file's path relative to the inbox"
        )
    return pattern


def check_json_value(value: object, where: str = "") -> Any:
    """Metadata must be JSON (the registry stores JSON); YAML dates and the like are not."""
    if isinstance(value, str) and "\x00" in value:
        bad(f"{where}holds a NUL character, which a registry on PostgreSQL cannot store")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            bad(f"{where}must be a finite number")
        return value
    if isinstance(value, list):
        return [check_json_value(item, f"{where}item {i}: ") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                bad(f"{where}key {key!r} must be text")
            if "\x00" in key:
                bad(f"{where}key {key!r} holds a NUL character")
            out[key] = check_json_value(item, f"{where}{key}: ")
        return out
    bad(
        f"{where}{describe(value)} cannot be stored in the registry's JSON metadata",
        hint="quote it to make it text",
    )


def expand_path(value: str, base: Path) -> Path:
    """``~`` expanded, relative to ``base``, absolute and normalised (symlinks kept)."""
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        bad(f"cannot expand {value!r}: no such user")
    return Path(os.path.normpath(os.path.join(base, expanded)))


def path_in(base: Path) -> Callable[[object], Path]:
    def check(value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            bad(f"must be a path (text), not {describe(value)}")
        if "\0" in value:
            bad("must not contain a NUL character")
        return expand_path(value.strip(), base)

    return check


CREDENTIALS_HINT = (
    "put credentials in the file named by registry_auth: a netrc file or one line user:password"
)


def http_url(value: str, *, what: str) -> str:
    """Normalised http(s) URL ending with "/"; never echoes a URL holding credentials."""
    text = value.strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        bad(f"{what}; this is not a valid URL")
    if "@" in parts.netloc:
        bad("must not contain a user name or password", hint=CREDENTIALS_HINT)
    if parts.scheme.lower() not in ("http", "https"):
        bad(f"{what}, not {text!r}")
    if not parts.hostname:
        bad(f"{text!r} has no host name")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        bad(f"{text!r} has an invalid port")
    if parts.query or parts.fragment:
        bad(f"{text!r} must not have a query (?...) or fragment (#...)")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def listen_address(value: object) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of a listening socket."""
    if not isinstance(value, str):
        bad(f"must be HOST:PORT as text, not {describe(value)}", "e.g. 127.0.0.1:9464")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        bad(f"{value!r} is not HOST:PORT", "e.g. 127.0.0.1:9464 (only this host can scrape it)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        bad(f"{value!r}: the port must be a number from 1 to 65535", "e.g. 127.0.0.1:9464")
    return host, int(port)


def is_local_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents
