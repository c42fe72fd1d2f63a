"""Structured logging for nbankd and nbankctl (structlog), to the journal, JSON or a console.

``configure_logging(format, level)`` is called once at start (and again on reload) with the
``log:`` section of the configuration. Formats:

- ``journal``: native journald entries through ``systemd.journal.send`` (the optional
  ``nbankd[systemd]`` extra), with ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER=nbankd``
  and every bound field as ``NBANK_<KEY>`` (``NBANK_RESOURCE_ID``, ``NBANK_INBOX``,
  ``NBANK_ITEM``, ...), so ``journalctl NBANK_RESOURCE_ID=abc123`` finds a resource;
- ``json``: one JSON object per line on stdout. When stdout is the journal's stream
  (``$JOURNAL_STREAM``), each line is prefixed with ``<N>`` so journald still records
  the right priority without the extra;
- ``console``: structlog's human rendering, for a terminal;
- ``auto``: journal under systemd when the extra is installed, console on a tty, else json.

Secrets never reach any output: :func:`redact_secrets` runs in every chain before the
renderer. Records of the standard ``logging`` module (watchdog, urllib3, ...) at warning
and above go through the same chain and output.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from nbankd.errors import ConfigError
from nbankd.names import utf8_text

__all__ = [
    "FORMATS",
    "LEVELS",
    "PRIORITIES",
    "JournalLogger",
    "configure_logging",
    "get_logger",
    "journal_available",
    "journal_fields",
    "journal_stream_matches",
    "redact",
    "redact_secrets",
    "redact_text",
    "reset_logging",
    "resolve_format",
]

FORMATS = ("auto", "journal", "json", "console")
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: syslog priority of each structlog level name, as journald and ``<N>`` prefixes use it.
PRIORITIES: dict[str, int] = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
SYSLOG_IDENTIFIER = "nbankd"
REDACTED = "[redacted]"

_INSTALL_HINT = (
    "install the extra with `pip install 'nbankd[systemd]'` (building systemd-python needs "
    "libsystemd-dev and pkg-config), or set log.format to auto, json or console"
)

# --- redaction -------------------------------------------------------------------------

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
    None, which cannot hold a secret: ``authorized=True`` stays readable); strings are
    scanned with :func:`redact_text`; exceptions become their redacted message.
    """
    if _depth > _MAX_DEPTH:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if _is_secret_key(k) and _holds_data(v) else redact(v, _depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, tuple):
        return tuple(redact(v, _depth + 1) for v in value)
    if isinstance(value, list | set | frozenset):
        return [redact(v, _depth + 1) for v in value]
    return value


def _holds_data(value: object) -> bool:
    return value is not None and not isinstance(value, bool)


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hides secrets in every key and value of the event."""
    return redact(event_dict)  # type: ignore[no-any-return]


def writable_text(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: text values that every output can write. A file name that is
    not UTF-8 reaches a log line escaped; unescaped, writing it raised (a strict UTF-8
    stdout, the journal), and a log line failing after a save broke the step after it."""
    return {k: utf8_text(v) if isinstance(v, str) else v for k, v in event_dict.items()}


# --- journal ---------------------------------------------------------------------------

# Bound keys with a fixed journal field name; any other key becomes NBANK_<KEY>.
_FIELD_NAMES = {
    "resource_id": "NBANK_RESOURCE_ID",
    "inbox": "NBANK_INBOX",
    "item": "NBANK_ITEM",
}
_CODE_FIELDS = {"pathname": "CODE_FILE", "lineno": "CODE_LINE", "func_name": "CODE_FUNC"}
_DROPPED = frozenset({"event", "level", "timestamp", "exception"})


def _field_name(key: str) -> str | None:
    if key in _FIELD_NAMES:
        return _FIELD_NAMES[key]
    if key.startswith("_"):  # structlog internals (_record, _from_structlog, ...)
        return None
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return ("NBANK_" + name)[:64]


def _field_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, default=str, sort_keys=True, ensure_ascii=False)


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """Returns the journald fields for a processed structlog event (pure).

    ``MESSAGE`` is the event (with the traceback appended when there is one),
    ``PRIORITY`` comes from the level, ``SYSLOG_IDENTIFIER`` is ``nbankd``; callsite keys
    become ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``; ``resource_id``, ``inbox`` and
    ``item`` become ``NBANK_RESOURCE_ID``, ``NBANK_INBOX`` and ``NBANK_ITEM``; every other
    key becomes ``NBANK_<KEY>`` (upper case, other characters as ``_``), simple values as
    text and lists or mappings as compact JSON. None values are left out; the timestamp
    is left to journald, which stamps each entry itself.
    """
    level = str(event_dict.get("level", "info")).lower()
    message = str(event_dict.get("event", ""))
    exception = event_dict.get("exception")
    if exception:
        message = f"{message}\n{exception}"
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, PRIORITIES["info"])),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
    }
    for key, value in event_dict.items():
        if key in _DROPPED or value is None:
            continue
        if key in _CODE_FIELDS:
            fields[_CODE_FIELDS[key]] = str(value)
            continue
        name = _field_name(str(key))
        if name is not None:
            fields[name] = _field_value(value)
    return fields


def _journal_renderer(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # Returning a dict makes structlog call the logger method with it as keyword arguments.
    return journal_fields(event_dict)  # type: ignore[return-value]


def journal_available() -> bool:
    """True when ``systemd.journal`` (the ``nbankd[systemd]`` extra) can be imported."""
    try:
        from systemd import journal  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


class JournalLogger:
    """structlog logger that sends journal fields with ``systemd.journal.send``.

    If journald cannot be reached, the entry is written as a JSON line to ``fallback``
    (stderr by default, which systemd also captures) instead of being lost.
    """

    def __init__(self, fallback: IO[str] | None = None) -> None:
        from systemd import journal

        self._send = journal.send
        self._fallback = fallback

    def msg(self, **fields: str) -> None:
        args: dict[str, Any] = dict(fields)
        if "CODE_LINE" in args:  # systemd.journal.send wants an int here
            try:
                args["CODE_LINE"] = int(args["CODE_LINE"])
            except ValueError:
                del args["CODE_LINE"]
        try:
            self._send(**args)
        except (OSError, ValueError):
            out = self._fallback or sys.stderr
            out.write(json.dumps(fields, sort_keys=True) + "\n")
            out.flush()

    log = debug = info = warning = warn = error = exception = critical = fatal = msg


class _JournalLoggerFactory:
    def __call__(self, *_args: Any) -> JournalLogger:
        return JournalLogger()


# --- JSON lines ------------------------------------------------------------------------


class _JsonLines:
    """Renders one JSON object per line, optionally with a ``<N>`` syslog priority prefix."""

    def __init__(self, priority_prefix: bool) -> None:
        self._json = structlog.processors.JSONRenderer(default=str, ensure_ascii=False)
        self._prefix = priority_prefix

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        level = str(event_dict.get("level", "info")).lower()
        line = str(self._json(logger, method, event_dict))
        if self._prefix:
            return f"<{PRIORITIES.get(level, PRIORITIES['info'])}>{line}"
        return line


# --- choosing the format ---------------------------------------------------------------


def journal_stream_matches(value: str | None, fds: Iterable[int] = (1, 2)) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEVICE:INODE``) names one of ``fds``' files.

    systemd sets it for a service whose stdout/stderr go to the journal; comparing it
    with the descriptors tells that apart from a variable inherited by a program whose
    output was redirected elsewhere.
    """
    if not value:
        return False
    try:
        dev_text, ino_text = value.split(":", 1)
        dev, ino = int(dev_text), int(ino_text)
    except ValueError:
        return False
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == dev and st.st_ino == ino:
            return True
    return False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _fileno(stream: IO[str]) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def resolve_format(
    format: str,
    stream: IO[str],
    *,
    environ: Mapping[str, str] | None = None,
    have_journal: bool | None = None,
    fds: Iterable[int] = (1, 2),
) -> str:
    """Returns the concrete format (journal, json or console) for a ``log.format`` value.

    ``auto`` is journal when ``$JOURNAL_STREAM`` names stdout or stderr (``fds``) and the
    extra is installed, console when ``stream`` is a terminal, json otherwise. An explicit
    ``journal`` without the extra is a :class:`ConfigError` naming the extra to install.
    """
    env = os.environ if environ is None else environ
    if format not in FORMATS:
        raise ConfigError(
            f"log.format: {format!r} is not one of {', '.join(FORMATS)}",
            hint="auto picks the journal under systemd, a console on a terminal, else JSON",
        )
    journal_ok = journal_available() if have_journal is None else have_journal
    if format == "journal":
        if not journal_ok:
            raise ConfigError(
                "log.format: journal needs the systemd extra, which is not installed",
                hint=_INSTALL_HINT,
            )
        return "journal"
    if format != "auto":
        return format
    if journal_ok and journal_stream_matches(env.get("JOURNAL_STREAM"), fds):
        return "journal"
    return "console" if _isatty(stream) else "json"


# --- the standard logging module -------------------------------------------------------


class _StdlibBridge(logging.Handler):
    """Sends standard ``logging`` records through the structlog chain (same output)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            structlog.get_logger().log(_std_level(record.levelno), record.getMessage(), **kw)
        except Exception:  # never let a logging problem break the caller
            self.handleError(record)


def _std_level(levelno: int) -> int:
    """Returns the standard level at or below ``levelno`` (custom levels like 25 -> info)."""
    known = [n for n in sorted(LEVELS.values()) if n <= levelno]
    return known[-1] if known else logging.DEBUG


def _remove_bridge() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)


# --- set-up ----------------------------------------------------------------------------


def _check_level(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(
            f"log.level: {level!r} is not one of {', '.join(LEVELS)}",
            hint="info is the usual level; debug shows every step of every deposit",
        ) from None


def configure_logging(
    format: str = "auto", level: str = "info", stream: IO[str] | None = None
) -> str:
    """Configures structlog (and routes stdlib ``logging``) for the whole process.

    ``stream`` is where json and console output go (default: stdout). Returns the
    concrete format chosen (journal, json or console). May be called again (reload):
    the new settings replace the old ones. Bad values raise :class:`ConfigError`.
    """
    min_level = _check_level(level)
    out = sys.stdout if stream is None else stream
    chosen = resolve_format(format, out)

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    logger_factory: Any
    if chosen == "journal":
        processors += [
            structlog.processors.CallsiteParameterAdder(
                [
                    structlog.processors.CallsiteParameter.PATHNAME,
                    structlog.processors.CallsiteParameter.LINENO,
                    structlog.processors.CallsiteParameter.FUNC_NAME,
                ],
                additional_ignores=["logging", __name__],
            ),
            structlog.processors.format_exc_info,
            redact_secrets,
            writable_text,
            _journal_renderer,
        ]
        logger_factory = _JournalLoggerFactory()
    elif chosen == "console":
        processors += [
            structlog.processors.format_exc_info,
            redact_secrets,
            writable_text,
            structlog.dev.ConsoleRenderer(
                colors=_isatty(out), exception_formatter=structlog.dev.plain_traceback
            ),
        ]
        logger_factory = structlog.WriteLoggerFactory(file=out)
    else:
        fd = _fileno(out)
        prefix = fd is not None and journal_stream_matches(os.environ.get("JOURNAL_STREAM"), [fd])
        processors += [
            structlog.processors.format_exc_info,
            redact_secrets,
            writable_text,
            _JsonLines(prefix),
        ]
        logger_factory = structlog.WriteLoggerFactory(file=out)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        context_class=dict,
        logger_factory=logger_factory,
        # Not cached, so that a reload (or a test) that reconfigures takes effect for
        # loggers made earlier with get_logger().
        cache_logger_on_first_use=False,
    )

    _remove_bridge()
    bridge = _StdlibBridge(level=max(logging.WARNING, min_level))
    root = logging.getLogger()
    root.addHandler(bridge)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return chosen


def reset_logging() -> None:
    """Undoes :func:`configure_logging`: structlog defaults, no stdlib bridge."""
    _remove_bridge()
    logging.captureWarnings(False)
    structlog.reset_defaults()


def get_logger(**bound: Any) -> Any:
    """Returns a structlog logger with ``bound`` fields (e.g. ``inbox=``, ``item=``).

    Safe to call at import time: the logger follows the configuration in force when it
    logs, not when it was made.
    """
    return structlog.get_logger(**bound)
