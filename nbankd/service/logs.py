"""Structured logging for nbankd and nbankctl (structlog), to the journal, JSON or a console.

``configure_logging(format, level)`` is called once at start (and again on reload) with the
``log:`` section of the configuration. Formats:

- ``journal``: native journald entries, sent by nbankd itself in journald's native
  protocol without ever waiting (:mod:`.journald`), with ``MESSAGE``, ``PRIORITY``,
  ``SYSLOG_IDENTIFIER=nbankd`` and every bound field as ``NBANK_<KEY>``
  (``NBANK_RESOURCE_ID``, ``NBANK_INBOX``, ``NBANK_ITEM``, ...), so
  ``journalctl NBANK_RESOURCE_ID=abc123`` finds a resource;
- ``json``: one JSON object per line on stdout. When stdout is the journal's stream
  (``$JOURNAL_STREAM``), each line is prefixed with ``<N>`` so journald still records
  the right priority;
- ``console``: structlog's human rendering, for a terminal;
- ``auto``: journal under systemd (journald's socket there), console on a tty, else json.

Secrets never reach any output: :func:`redact_secrets` (:mod:`.redaction`) runs in
every chain before the renderer. Every value is then cut to a few KiB and every line
to 32 KiB (:mod:`.logshape`). Records of the standard ``logging`` module (watchdog,
urllib3, ...) at warning and above go through the same chain and output.

A log call never raises: an error in the chain gives a short line naming it, and the
lines go out through :mod:`.logwriter` (in the daemon, a queue written by a thread of
its own: a failing or blocked output drops lines, counted, and never stops a deposit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from nbankd.errors import ConfigError
from nbankd.names import utf8_text
from nbankd.service import logshape, logwriter
from nbankd.service.journald import JOURNAL_SOCKET, JournalSocket, NoJournal, encode_entry
from nbankd.service.redaction import REDACTED, redact, redact_secrets, redact_text

__all__ = [
    "FORMATS",
    "LEVELS",
    "PRIORITIES",
    "REDACTED",
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


def journal_available(path: str = JOURNAL_SOCKET) -> bool:
    """True when journald's socket is at ``path`` (a journald may take entries)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


class JournalLogger:
    """structlog logger that sends journal fields to journald's socket (``path``),
    in journald's native protocol, never waiting (:mod:`.journald`).

    If no journald listens there, the entry is written as a JSON line to ``fallback``
    (stderr by default, which systemd also captures) instead of being lost; a journald
    that takes no entry (its queue full) has it dropped and counted. Entries go
    through :data:`~nbankd.service.logwriter.OUTPUT`: a log call never raises.
    """

    def __init__(self, fallback: IO[str] | None = None, path: str = JOURNAL_SOCKET) -> None:
        self._socket = JournalSocket(path)
        self._fallback = fallback

    def msg(self, **fields: str) -> None:
        size = sum(len(k) + len(str(v)) for k, v in fields.items())
        logwriter.OUTPUT.submit(self._deliver, JournalLogger, fields, size)

    def _deliver(self, fields: dict[str, str]) -> None:
        try:
            self._socket.send(encode_entry(fields))
        except NoJournal:
            out = self._fallback or sys.stderr
            logwriter.stream_writer(out)(json.dumps(fields, sort_keys=True))

    log = debug = info = warning = warn = error = exception = critical = fatal = msg


class _JournalLoggerFactory:
    def __init__(self, path: str) -> None:
        self._logger = JournalLogger(path=path)

    def __call__(self, *_args: Any) -> JournalLogger:
        return self._logger


def _journal_fallback(method: str, event: str, problem: str) -> dict[str, str]:
    """The journal entry of an event whose processing failed."""
    return {
        "MESSAGE": event,
        "PRIORITY": str(PRIORITIES.get(method, PRIORITIES["info"])),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "NBANK_LOG_ERROR": problem,
    }


# --- lines on a stream -----------------------------------------------------------------


class _LineLogger:
    """structlog logger handing each rendered line for ``stream`` to the log output."""

    def __init__(self, stream: IO[str]) -> None:
        self._write = logwriter.stream_writer(stream)
        fd = _fileno(stream)  # the output's key for its backoff
        self._key: object = fd if fd is not None else id(stream)

    def msg(self, message: str) -> None:
        logwriter.OUTPUT.submit(self._write, self._key, message, len(message))

    log = debug = info = warning = warn = error = exception = critical = fatal = msg


class _LineLoggerFactory:
    def __init__(self, stream: IO[str]) -> None:
        self._logger = _LineLogger(stream)

    def __call__(self, *_args: Any) -> _LineLogger:
        return self._logger


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

    ``auto`` is journal when ``$JOURNAL_STREAM`` names stdout or stderr (``fds``) and
    journald's socket is there (``have_journal``, default :func:`journal_available`),
    console when ``stream`` is a terminal, json otherwise. An explicit ``journal`` is
    journal (entries go to stderr while no journald listens).
    """
    env = os.environ if environ is None else environ
    if format not in FORMATS:
        raise ConfigError(
            f"log.format: {format!r} is not one of {', '.join(FORMATS)}",
            hint="auto picks the journal under systemd, a console on a terminal, else JSON",
        )
    if format != "auto":
        return format
    journal_ok = journal_available() if have_journal is None else have_journal
    if journal_ok and journal_stream_matches(env.get("JOURNAL_STREAM"), fds):
        return "journal"
    return "console" if _isatty(stream) else "json"


def _stream_name(stream: IO[str]) -> str:
    """How the status names a stream output."""
    fd = _fileno(stream)
    if fd == 1:
        return "nbankd's stdout"
    if fd == 2:
        return "nbankd's stderr"
    return "nbankd's log stream"


# --- the standard logging module -------------------------------------------------------


class _StdlibBridge(logging.Handler):
    """Sends standard ``logging`` records through the structlog chain (same output)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            structlog.get_logger().log(_std_level(record.levelno), record.getMessage(), **kw)
        except Exception:  # never let a logging problem break the caller (handleError
            logwriter.OUTPUT.dropped_one()  # would write to stderr, which may block)


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
    format: str = "auto",
    level: str = "info",
    stream: IO[str] | None = None,
    *,
    journal_socket: str = JOURNAL_SOCKET,
) -> str:
    """Configures structlog (and routes stdlib ``logging``) for the whole process.

    ``stream`` is where json and console output go (default: stdout); journal entries
    go to journald's socket ``journal_socket`` (stderr while nobody listens). Returns the
    concrete format chosen (journal, json or console). May be called again (reload):
    the new settings replace the old ones. Bad values raise :class:`ConfigError`.
    """
    min_level = _check_level(level)
    out = sys.stdout if stream is None else stream
    chosen = resolve_format(format, out, have_journal=journal_available(journal_socket))

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # redaction sees every value whole; then values are cut to size (logshape)
    safe: list[Processor] = [
        structlog.processors.format_exc_info,
        redact_secrets,
        writable_text,
        logshape.bounded_values,
    ]
    logger_factory: Any
    fallback: Any
    if chosen == "journal":
        processors += [
            structlog.processors.CallsiteParameterAdder(
                [
                    structlog.processors.CallsiteParameter.PATHNAME,
                    structlog.processors.CallsiteParameter.LINENO,
                    structlog.processors.CallsiteParameter.FUNC_NAME,
                ],
                additional_ignores=["logging", __name__, logshape.__name__],
            ),
            *safe,
            _journal_renderer,
        ]
        logger_factory, fallback = _JournalLoggerFactory(journal_socket), _journal_fallback
        logwriter.OUTPUT.output = (
            f"journald ({journal_socket})",
            "journald stuck? while it is not there, entries go to nbankd's stderr",
        )
    elif chosen == "console":
        processors += [
            *safe,
            logshape.BoundedLine(
                structlog.dev.ConsoleRenderer(
                    colors=_isatty(out), exception_formatter=structlog.dev.plain_traceback
                )
            ),
        ]
        logger_factory, fallback = _LineLoggerFactory(out), logshape.console_fallback
        logwriter.OUTPUT.output = (_stream_name(out), "a pipe nobody reads?")
    else:
        fd = _fileno(out)
        prefix = fd is not None and journal_stream_matches(os.environ.get("JOURNAL_STREAM"), [fd])
        processors += [*safe, logshape.BoundedLine(logshape.JsonLines(prefix, PRIORITIES))]
        logger_factory, fallback = _LineLoggerFactory(out), logshape.json_fallback(prefix)
        logwriter.OUTPUT.output = (_stream_name(out), "a pipe nobody reads?")

    structlog.configure(
        processors=[logshape.Guarded(processors, fallback)],  # never raises
        # its %-interpolation never raises either (logshape.interpolating_logger)
        wrapper_class=logshape.interpolating_logger(min_level),
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
    """Undoes :func:`configure_logging`: structlog defaults, no stdlib bridge, lines
    written in the caller's thread again (a writer thread started is stopped)."""
    logwriter.OUTPUT.stop(logwriter.FLUSH_AT_EXIT)
    _remove_bridge()
    logging.captureWarnings(False)
    structlog.reset_defaults()


def get_logger(**bound: Any) -> Any:
    """Returns a structlog logger with ``bound`` fields (e.g. ``inbox=``, ``item=``).

    Safe to call at import time: the logger follows the configuration in force when it
    logs, not when it was made.
    """
    return structlog.get_logger(**bound)
