"""The control socket's wire protocol: one JSON object per line, versioned.

A client connects to ``control_socket`` (AF_UNIX, stream), writes one request
line and reads one reply line; the server then closes the connection::

    -> {"v": 1, "cmd": "status", "args": {}}
    <- {"v": 1, "ok": true, "result": {...}}
    <- {"v": 1, "ok": false, "error": {"code": "denied", "message": "...", "exit": 2}}

``v`` is the protocol version. A server answers a request of another version
with the error ``unsupported-version`` (in its own version), so old and new
clients fail clearly instead of misreading each other. Requests are at most
:data:`MAX_REQUEST` bytes; replies may be large (history, queue).

Error codes (stable). An error reply also carries ``exit``, the exit status
nbankctl gives it (SPEC: 1 problems, 2 usage, 3 unreachable), decided where the
error is raised, so the client needs no table of its own:

=====================  =============================================================
``bad-request``        not one JSON object with ``cmd`` (str) and ``args`` (object),
                       or a number that is not finite (``NaN``, ``Infinity``, ``1e999``)
``too-large``          the request line is longer than :data:`MAX_REQUEST`
``unsupported-version`` ``v`` is not :data:`VERSION`
``unknown-command``    ``cmd`` names no command
``usage``              bad or missing arguments for the command
``denied``             the peer's user may not run this command
``not-found``          the path or inbox named is not known
``conflict``           the operation would overwrite or clash (requeue: name taken)
``config``             the configuration file is invalid (reload)
``not-implemented``    the command exists but this daemon does not provide it
``busy``               too many connections at once; retry
``internal``           a bug in the daemon (logged there with a traceback)
=====================  =============================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from nbankd.errors import EXIT_PROBLEMS, EXIT_UNREACHABLE, EXIT_USAGE

VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_REPLY = 256 * 1024 * 1024
#: entries of each of ``queue``'s lists described at most (the rest are only counted)
QUEUE_LIMIT = 1000

#: commands anyone in ``control.readers`` (or an admin) may run
READ_COMMANDS = frozenset({"status", "queue", "history", "explain"})
#: commands that change state: ``control.admins`` only
ADMIN_COMMANDS = frozenset(
    {
        "requeue",
        "pause",
        "resume",
        "rescan",
        "audit",
        "reload",
        "check-registry",
        "deposit",
        "deposit-status",
        "copy",
        "tape-import",
        "job-status",
    }
)
COMMANDS = READ_COMMANDS | ADMIN_COMMANDS


class ProtocolError(Exception):
    """A request or reply that breaks the protocol, or a command that failed.

    ``code`` is one of the codes in the module docstring; ``message`` is for people;
    ``exit_code`` is nbankctl's exit status for it.
    """

    def __init__(
        self, code: str, message: str, *, details: Any = None, exit_code: int = EXIT_USAGE
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.exit_code = exit_code  # a request's fault (2) unless said otherwise


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    v: int = VERSION


def encode_request(cmd: str, args: dict[str, Any] | None = None) -> bytes:
    """One request line (UTF-8 JSON, newline-terminated)."""
    return _line({"v": VERSION, "cmd": cmd, "args": dict(args or {})})


def decode_request(line: bytes) -> Request:
    """Parses one request line; raises :class:`ProtocolError` with the reason."""
    if len(line) > MAX_REQUEST:
        raise ProtocolError("too-large", f"request longer than {MAX_REQUEST} bytes")
    try:
        data = json.loads(line.decode("utf-8"), parse_constant=_not_a_number, parse_float=_finite)
    except _NotFinite as err:
        raise ProtocolError(
            "bad-request",
            f"request holds {err}, which is not a JSON number: send finite numbers only",
        ) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError("bad-request", f"request is not JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("bad-request", "request is nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad-request", "request must be a JSON object")
    v = data.get("v")
    if v != VERSION:
        raise ProtocolError(
            "unsupported-version",
            f"protocol version {v!r} is not supported; this nbankd speaks version {VERSION}",
        )
    cmd = data.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("bad-request", "request has no 'cmd' string")
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("bad-request", "'args' must be a JSON object")
    if cmd not in COMMANDS:
        raise ProtocolError(
            "unknown-command", f"unknown command {cmd!r}; known: {', '.join(sorted(COMMANDS))}"
        )
    return Request(cmd=cmd, args=args, v=v)


class _NotFinite(ValueError):
    """A request's number is NaN or infinite (Python's json reads them; JSON has none)."""


def _not_a_number(text: str) -> float:
    raise _NotFinite(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise _NotFinite(text)
    return value


def encode_result(result: Any) -> bytes:
    return _line({"v": VERSION, "ok": True, "result": result})


def encode_error(code: str, message: str, details: Any = None, *, exit_code: int) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "exit": exit_code}
    if details is not None:
        error["details"] = details
    return _line({"v": VERSION, "ok": False, "error": error})


def decode_reply(line: bytes) -> Any:
    """The result of a reply line; raises :class:`ProtocolError` for an error reply."""
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError("bad-request", f"the daemon's reply is not JSON: {err}") from None
    if not isinstance(data, dict) or "ok" not in data:
        raise ProtocolError("bad-request", "the daemon's reply is not a protocol reply")
    if data.get("v") != VERSION:
        raise ProtocolError(
            "unsupported-version",
            f"the daemon speaks protocol version {data.get('v')!r}, this nbankctl {VERSION}",
        )
    if data["ok"]:
        return data.get("result")
    error = data.get("error") or {}
    code = str(error.get("code", "internal"))
    status = error.get("exit")
    if status not in (EXIT_PROBLEMS, EXIT_USAGE, EXIT_UNREACHABLE):
        status = _exit_of_older_daemon(code)
    raise ProtocolError(
        code,
        str(error.get("message", "the daemon reported an error")),
        details=error.get("details"),
        exit_code=status,
    )


def _exit_of_older_daemon(code: str) -> int:
    """The exit status of an error from a daemon of an earlier release, whose replies
    did not carry ``exit`` yet (nbankctl upgraded before the daemon restarted)."""
    if code in ("conflict", "internal"):
        return EXIT_PROBLEMS
    return EXIT_UNREACHABLE if code == "busy" else EXIT_USAGE


def _line(obj: dict[str, Any]) -> bytes:
    # ASCII-only: file names may hold lone surrogates (undecodable bytes), which
    # UTF-8 cannot encode but JSON escapes (backslash-u) carry unchanged
    return (json.dumps(obj, ensure_ascii=True, default=str) + "\n").encode("ascii")


def string_arg(args: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    """A request's argument ``key`` as a non-empty string (None when absent and not
    ``required``); anything else is the client's error."""
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError("usage", f"{key!r} must be a non-empty string")
    no_nul(key, value)
    return value


def no_nul(key: str, value: str) -> str:
    """``value``, the request's argument ``key``; a usage error when it holds a NUL byte,
    which no path, name or identifier can hold (the OS would refuse it later)."""
    if "\x00" in value:
        raise ProtocolError(
            "usage", f"argument {key!r} holds a NUL byte ({value!r}); no path or name can"
        )
    return value


def wait_arg(args: dict[str, Any], key: str, ceiling: float) -> float:
    """A request's number of seconds to wait ``key`` (0 when absent), clamped to 0 ..
    ``ceiling``: a usage error unless a finite number, so no request waits longer
    than the command allows, and none spins on NaN."""
    value = args.get(key, 0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("usage", f"{key!r} must be a number of seconds")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError("usage", f"{key!r} must be a finite number of seconds, not {value}")
    return float(min(max(value, 0), ceiling))  # compared first: a huge int never overflows


__all__ = [
    "ADMIN_COMMANDS",
    "COMMANDS",
    "MAX_REPLY",
    "MAX_REQUEST",
    "QUEUE_LIMIT",
    "READ_COMMANDS",
    "VERSION",
    "ProtocolError",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_request",
    "encode_result",
    "no_nul",
    "string_arg",
    "wait_arg",
]
