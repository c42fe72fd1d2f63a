"""Secrets kept out of log lines: :func:`redact_secrets`, a structlog processor run in
every chain of :mod:`nbankd.service.logs` before the line is cut to size or rendered.

A value under a secret-looking key (password, token, ...) is replaced whole; in text,
URL passwords, ``Authorization`` values and ``password=...`` are hidden.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from structlog.typing import EventDict, WrappedLogger

__all__ = ["REDACTED", "redact", "redact_key", "redact_secrets", "redact_text"]

REDACTED = "[redacted]"

# Keys whose value is a secret whatever it looks like.
_SECRET_KEY = re.compile(
    r"passw(?:or)?d|passphrase|auth|credential|token|secret|api[-_]?key|cookie|netrc",
    re.IGNORECASE,
)
# scheme://user:password@host -> scheme://user:[redacted]@host
_URL_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):(?P<pw>[^/@\s]+)@")
# Authorization: Basic xyz / 'Authorization': 'Bearer xyz' / authorization=xyz
_AUTH_HEADER = re.compile(
    r"(?P<head>\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)"
    r"(?P<value>(?:(?:basic|bearer|digest|token|negotiate)\s+)?[^\s'\",;)}]+)",
    re.IGNORECASE,
)
# password=xyz, token: xyz, secret='xyz' inside free text
_INLINE_SECRET = re.compile(
    r"(?P<head>\b(?:passw(?:or)?d|pwd|passphrase|token|secret|api[-_]?key)['\"]?\s*[=:]\s*['\"]?)"
    r"(?P<value>[^\s'\",;&)}]+)",
    re.IGNORECASE,
)
_MAX_DEPTH = 8


# what one of the three patterns above needs in a text to match, in lower case: an
# ASCII text holding none of these is returned as it is (every log line's every value
# is redacted; most are paths, identifiers and hashes)
_SECRET_SIGNS = re.compile(
    "@|authorization|passw|pwd|passphrase|token|secret|api", re.IGNORECASE | re.ASCII
)


def redact_text(text: str) -> str:
    """Returns ``text`` with URL passwords, Authorization values and ``password=...`` hidden."""
    if text.isascii() and _SECRET_SIGNS.search(text) is None:  # one pass, in C
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['head']}{REDACTED}", text)
    return _INLINE_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and _secret_key_name(key)


@functools.lru_cache(maxsize=1024)
def _secret_key_name(key: str) -> bool:
    """True for a key whose value is a secret (a log line's keys are few: remembered)."""
    return _SECRET_KEY.search(key) is not None


def redact(value: Any, _depth: int = 0) -> Any:
    """Returns a copy of ``value`` with secrets hidden, looking into dicts, lists and tuples.

    Values under a secret-looking key are replaced whole (unless they are booleans or
    None, which cannot hold a secret: ``authorized=True`` stays readable); strings, and
    a mapping's keys (:func:`redact_key`), are scanned with :func:`redact_text`;
    exceptions become their redacted message.
    """
    if _depth > _MAX_DEPTH:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            shown = REDACTED if _is_secret_key(k) and _holds_data(v) else redact(v, _depth + 1)
            out[_free_key(redact_key(k), out)] = shown
        return out
    if isinstance(value, tuple):
        return tuple(redact(v, _depth + 1) for v in value)
    if isinstance(value, list | set | frozenset):
        return [redact(v, _depth + 1) for v in value]
    return value


def redact_key(key: Any) -> Any:
    """A mapping's key with secrets hidden: a text key as :func:`redact_text` does; a
    key of another kind but a number, a boolean or None as its redacted text (it is
    shown as its text: a tuple holding a URL with its password)."""
    if isinstance(key, str):
        return redact_text(key)
    if key is None or isinstance(key, int | float):
        return key
    return redact_text(str(key))


def _free_key(key: Any, taken: Mapping[Any, Any]) -> Any:
    """``key``, or ``key #2``, ``#3``... when two keys are the same once redacted
    (two URLs differing only by their password): both are kept."""
    if key not in taken:
        return key
    n = 2
    while f"{key} #{n}" in taken:
        n += 1
    return f"{key} #{n}"


def _holds_data(value: object) -> bool:
    return value is not None and not isinstance(value, bool)


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hides secrets in every key and value of the event."""
    return redact(event_dict)  # type: ignore[no-any-return]
