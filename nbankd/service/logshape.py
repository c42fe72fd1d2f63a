"""The shape of a log line: bounded values, a bounded line, a chain that never raises.

- :func:`bounded_values` (a structlog processor, after redaction): a text value longer
  than :data:`VALUE_MAX` characters keeps its beginning and says how much was cut (a
  traceback keeps its beginning and its end, within :data:`TRACEBACK_MAX`); a list or
  mapping keeps its first :data:`ITEMS_MAX` entries and says how many more there were.
- :class:`BoundedLine` wraps a renderer: a line still longer than :data:`LINE_MAX`
  bytes (many long values) is rendered again with every value cut short, then with the
  event alone: journald splits a stdout line longer than its ``LineMax`` (48 KiB by
  default), and half a JSON object parses as nothing.
- :class:`Guarded` runs a whole processor chain: an error in any processor (a value
  whose ``str()`` raises, ...) gives a short line saying so instead of raising into
  the code that logged; its message and the error's text are redacted first (the
  chain's own redaction may not have run).
- :func:`interpolating_logger`: the bound logger class a log call goes through, whose
  ``%``-interpolation of positional arguments (``log.info("x %s", a)``, done before
  any processor runs) never raises either: arguments that do not fit the message
  give the message as written, its arguments and the error (``log_error``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from nbankd.service.redaction import redact_text

__all__ = [
    "ITEMS_MAX",
    "LINE_MAX",
    "TRACEBACK_MAX",
    "VALUE_MAX",
    "BoundedLine",
    "Guarded",
    "JsonLines",
    "bounded_values",
    "cut_text",
    "interpolating_logger",
]

#: characters a text value of a log line keeps
VALUE_MAX = 4096
#: characters a traceback (``exception``) keeps, its beginning and its end
TRACEBACK_MAX = 16384
#: entries a list or mapping value keeps
ITEMS_MAX = 32
#: bytes a rendered line may hold (under journald's default LineMax of 48 KiB)
LINE_MAX = 32 * 1024
#: characters each value keeps when a line is rendered again, too long
SHORT_VALUE = 256
_MAX_DEPTH = 6
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3}


def cut_text(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def _cut_traceback(text: str, limit: int) -> str:
    """A long traceback's beginning and its end (where the error is), the middle cut."""
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


def _bounded(value: Any, limit: int, depth: int = 0) -> Any:
    if isinstance(value, str):
        return cut_text(value, limit)
    if depth >= _MAX_DEPTH:
        return value if isinstance(value, int | float | bool | None) else "..."
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {cut_text(str(k), limit): _bounded(v, limit, depth + 1) for k, v in items[:ITEMS_MAX]}
        if len(items) > ITEMS_MAX:
            out["..."] = f"{len(items) - ITEMS_MAX} more"
        return out
    if isinstance(value, list | tuple):
        kept: list[Any] = [_bounded(v, limit, depth + 1) for v in value[:ITEMS_MAX]]
        if len(value) > ITEMS_MAX:
            kept.append(f"... and {len(value) - ITEMS_MAX} more")
        return kept
    return value


def bounded_values(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: every value of the event within :data:`VALUE_MAX` (see the
    module's documentation); runs after redaction, which must see a secret whole."""
    return {
        k: _cut_traceback(v, TRACEBACK_MAX)
        if k == "exception" and isinstance(v, str)
        # a key is no longer than a value
        else _bounded(v, VALUE_MAX)
        for k, v in event_dict.items()
    }


def _short(event_dict: EventDict) -> EventDict:
    """The event with every value cut to :data:`SHORT_VALUE` characters."""
    out: EventDict = {}
    for key, value in event_dict.items():
        if key == "exception" and isinstance(value, str):
            out[key] = _cut_traceback(value, 8 * SHORT_VALUE)
        elif isinstance(value, str | int | float | bool) or value is None:
            out[key] = cut_text(value, SHORT_VALUE) if isinstance(value, str) else value
        else:
            out[key] = cut_text(json.dumps(value, default=str, ensure_ascii=False), SHORT_VALUE)
    return out


def _bare(event_dict: EventDict) -> EventDict:
    """The event alone: its message, level, time and logger, said to be cut."""
    keep = ("event", "level", "timestamp", "logger")
    out: EventDict = {k: event_dict[k] for k in keep if k in event_dict}
    out["event"] = cut_text(str(out.get("event", "")), 4 * SHORT_VALUE)
    out["log_line_cut"] = f"{len(event_dict) - len(out) + 1} field(s) left out, too long"
    return out


class BoundedLine:
    """Wraps a renderer of text lines: a line over :data:`LINE_MAX` bytes is rendered
    again with short values, then with the event alone."""

    def __init__(self, render: Callable[[WrappedLogger, str, EventDict], Any]) -> None:
        self._render = render

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        line = str(self._render(logger, method, dict(event_dict)))
        if _fits(line):
            return line
        line = str(self._render(logger, method, _short(event_dict)))
        if _fits(line):
            return line
        return str(self._render(logger, method, _bare(event_dict)))


def _fits(line: str) -> bool:
    # at most 4 bytes a character: only a long line is encoded to be measured
    return len(line) * 4 <= LINE_MAX or len(line.encode("utf-8", "replace")) <= LINE_MAX


class JsonLines:
    """Renders one JSON object per line, optionally with a ``<N>`` syslog priority prefix."""

    def __init__(self, priority_prefix: bool, priorities: Mapping[str, int]) -> None:
        self._json = structlog.processors.JSONRenderer(default=str, ensure_ascii=False)
        self._prefix = priority_prefix
        self._priorities = priorities

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        level = str(event_dict.get("level", "info")).lower()
        line = str(self._json(logger, method, event_dict))
        if self._prefix:
            return f"<{self._priorities.get(level, self._priorities['info'])}>{line}"
        return line


class Guarded:
    """A processor chain run as one processor that never raises (but structlog's
    ``DropEvent``): an error gives ``fallback``'s short line naming it, or a fixed one."""

    def __init__(
        self,
        processors: Sequence[Processor],
        fallback: Callable[[str, str, str], Any],
    ) -> None:
        self._processors = tuple(processors)
        self._fallback = fallback

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        event = event_dict.get("event")
        try:
            result: Any = event_dict
            for processor in self._processors:
                result = processor(logger, method, result)
            return result
        except Exception as err:
            try:  # the event as logged: redaction never saw it, nor the error's text
                what = cut_text(redact_text(str(event)), SHORT_VALUE)
                problem = cut_text(redact_text(f"{type(err).__name__}: {err}"), SHORT_VALUE)
            except Exception:
                what, problem = "?", type(err).__name__
            return self._fallback(method, what, problem)


def json_fallback(prefix: bool) -> Callable[[str, str, str], str]:
    """The short JSON line of an event whose processing failed."""

    def fallback(method: str, event: str, problem: str) -> str:
        line = json.dumps(
            {"event": event, "level": method, "log_error": problem}, ensure_ascii=True
        )
        return f"<{_PRIORITIES.get(method, 6)}>{line}" if prefix else line

    return fallback


def console_fallback(method: str, event: str, problem: str) -> str:
    """The short console line of an event whose processing failed (on one line)."""
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    text = f"{event} (log error: {problem})".encode("unicode_escape").decode("ascii")
    return f"{now} [{method:<9}] {text}"


# --- a log call's positional arguments ----------------------------------------------------


def _interpolated(event: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """``event % args`` as structlog does it (one non-empty mapping: by name); when
    that fails, ``event`` as written, ``kw`` given the arguments and the error."""
    try:
        one = len(args) == 1 and isinstance(args[0], Mapping) and args[0]
        return event % (args[0] if one else args)
    except Exception as err:
        kw["positional"] = list(args)
        kw["log_error"] = f"{type(err).__name__}: {err}"
        return event


def _event_method(name: str, level: int) -> Callable[..., Any]:
    """The bound logger's ``name`` method: the inner logger's at once without
    positional arguments (every call nbankd makes), interpolated here with them."""

    def method(self: _Interpolating, event: Any = None, *args: Any, **kw: Any) -> Any:
        inner = getattr(self._bound, name)
        if not args:
            return inner(event, **kw)
        if not self._bound.is_enabled_for(level):  # filtered out: never formatted
            return None
        return inner(_interpolated(event, args, kw), **kw)

    method.__name__ = name
    return method


def _event_at(self: _Interpolating, level: int, event: Any = None, *args: Any, **kw: Any) -> Any:
    return self._bound.log(level, _interpolated(event, args, kw) if args else event, **kw)


class _Interpolating:
    """A bound logger of ``inner`` (structlog's filtering bound logger class) whose
    positional arguments are interpolated here, never raising (:func:`_interpolated`);
    everything else is the inner logger's. (The asynchronous methods nbankd never
    calls are the inner logger's as they are.)"""

    inner: Any  # the class of the wrapped loggers (set by interpolating_logger)
    __slots__ = ("_bound",)

    def __init__(self, logger: Any, processors: Any, context: Any) -> None:
        self._bound = type(self).inner(logger, processors=processors, context=context)

    @classmethod
    def wrapping(cls, bound: Any) -> Any:
        made = object.__new__(cls)
        made._bound = bound
        return made

    debug = _event_method("debug", logging.DEBUG)
    info = _event_method("info", logging.INFO)
    msg = _event_method("msg", logging.INFO)
    warning = _event_method("warning", logging.WARNING)
    warn = _event_method("warn", logging.WARNING)
    error = _event_method("error", logging.ERROR)
    exception = _event_method("exception", logging.ERROR)
    critical = _event_method("critical", logging.CRITICAL)
    fatal = _event_method("fatal", logging.CRITICAL)
    log = _event_at

    def bind(self, **kw: Any) -> Any:
        return self.wrapping(self._bound.bind(**kw))

    def new(self, **kw: Any) -> Any:
        return self.wrapping(self._bound.new(**kw))

    def unbind(self, *keys: str) -> Any:
        return self.wrapping(self._bound.unbind(*keys))

    def try_unbind(self, *keys: str) -> Any:
        return self.wrapping(self._bound.try_unbind(*keys))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_bound":
            raise AttributeError(name)
        return getattr(self._bound, name)

    def __repr__(self) -> str:
        return f"<interpolating {self._bound!r}>"


def interpolating_logger(min_level: int) -> type:
    """The ``wrapper_class`` for structlog: its filtering bound logger at ``min_level``,
    a log call's ``%``-arguments interpolated without ever raising."""
    inner = structlog.make_filtering_bound_logger(min_level)
    return type(f"Interpolating{inner.__name__}", (_Interpolating,), {"inner": inner})
