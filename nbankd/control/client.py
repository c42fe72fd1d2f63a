"""The control socket client nbankctl uses: one request, one reply per connection.

Failures become errors of the one error tree, so nbankctl's exit status follows
SPEC section 4: :class:`~nbankd.errors.DaemonUnreachable` (exit 3) when no
daemon answers, :class:`ControlError` carrying the daemon's error code
otherwise (with the exit status the daemon sent with it).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.control import protocol

DEFAULT_TIMEOUT = 180.0  # reload may take a while (registry checks)
#: seconds between attempts to connect while the daemon's listen queue is full: the
#: first pause, doubled up to the last
CONNECT_RETRY_FIRST = 0.005
CONNECT_RETRY_MAX = 0.1


class ControlError(errors.NbankdError):
    """The daemon answered with an error; ``code`` is the protocol's error code."""

    def __init__(
        self,
        code: str,
        message: str,
        details: Any = None,
        exit_code: int = errors.EXIT_PROBLEMS,
    ) -> None:
        super().__init__(message)
        self._code = code
        self.details = details
        self._exit = exit_code  # as the daemon decided it, sent with the error

    @property  # type: ignore[override]
    def code(self) -> str:
        return self._code

    @property  # type: ignore[override]
    def exit_code(self) -> int:
        return self._exit


class ControlDenied(ControlError, errors.PermissionDenied):
    """The daemon refused the request for this user (exit 2)."""


NOT_RUNNING_HINT = (
    "start it with systemctl start nbankd; for a daemon run with another configuration, "
    "give -c FILE or set $NBANKD_CONFIG"
)


class ControlClient:
    """``hint`` is what to say when no socket exists (how to start that daemon)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float = DEFAULT_TIMEOUT,
        hint: str = NOT_RUNNING_HINT,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.hint = hint

    def _connect(self) -> socket.socket:
        """A connected socket. A full listen queue (EAGAIN: a burst of connections, or
        a client flooding the socket) is retried, waiting a little longer each time,
        until ``timeout`` has passed."""
        deadline = time.monotonic() + self.timeout
        pause = CONNECT_RETRY_FIRST
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(deadline - time.monotonic(), CONNECT_RETRY_FIRST))
            try:
                sock.connect(str(self.path))
            except BlockingIOError:  # EAGAIN: the daemon's listen queue is full
                sock.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.DaemonUnreachable(
                        f"nbankd's control socket {self.path} stayed busy for "
                        f"{self.timeout:g} s (its queue of waiting connections is full)",
                        hint="retry later, or give --timeout more seconds; 'ss -xp' shows "
                        "which processes hold connections to the socket",
                    ) from None
                time.sleep(min(pause, left))  # a back-off between attempts, not a sync
                pause = min(pause * 2, CONNECT_RETRY_MAX)
                continue
            except BaseException as err:
                sock.close()
                self._unreachable(err)
                raise
            sock.settimeout(self.timeout)  # the whole timeout for the reply
            return sock

    def _unreachable(self, err: BaseException) -> None:
        """Raises the error of the one error tree for a failed connect (or returns, for
        anything else: the caller raises it as it is)."""
        if isinstance(err, (FileNotFoundError, NotADirectoryError)):
            raise errors.DaemonUnreachable(
                f"nbankd is not running (no socket at {self.path})",
                hint=self.hint,
            ) from None
        if isinstance(err, ConnectionRefusedError):
            raise errors.DaemonUnreachable(
                f"nbankd is not running (nothing answers on {self.path})"
            ) from None
        if isinstance(err, PermissionError):
            raise errors.PermissionDenied(
                f"permission denied connecting to {self.path}",
                hint="ask an admin to give you access to the control socket's group",
            ) from None
        if isinstance(err, TimeoutError):
            raise errors.DaemonUnreachable(f"nbankd does not answer on {self.path}") from None
        if isinstance(err, OSError):
            raise errors.DaemonUnreachable(
                f"cannot connect to nbankd at {self.path}: {err.strerror or err}"
            ) from None

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Sends one command; returns the reply's result or raises."""
        with self._connect() as sock:
            closed = False
            try:
                try:
                    sock.sendall(protocol.encode_request(cmd, args))
                except OSError as err:
                    # the daemon may refuse at once (denied, busy) and close: its
                    # answer is still there to read
                    if err.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise
                    closed = True
                try:
                    line = _read_reply(sock)
                except errors.DaemonUnreachable:
                    if closed:
                        raise errors.DaemonUnreachable(
                            f"nbankd closed the connection during {cmd!r}"
                        ) from None
                    raise
            except TimeoutError:
                raise errors.DaemonUnreachable(
                    f"nbankd did not answer {cmd!r} within {self.timeout:g} s"
                ) from None
            except OSError as err:
                if err.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise errors.DaemonUnreachable(
                        f"nbankd closed the connection during {cmd!r}"
                    ) from None
                raise
        try:
            return protocol.decode_reply(line)
        except protocol.ProtocolError as err:
            cls = ControlDenied if err.code == "denied" else ControlError
            raise cls(err.code, err.message, err.details, err.exit_code) from None


def _read_reply(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > protocol.MAX_REPLY:
            raise ControlError(
                "too-large", "the daemon's reply is too large", exit_code=errors.EXIT_USAGE
            )
    if not chunks:
        raise errors.DaemonUnreachable("nbankd closed the connection without answering")
    return b"".join(chunks)


def call(path: str | os.PathLike[str], cmd: str, args: dict[str, Any] | None = None) -> Any:
    """One command over the socket at ``path``; see :meth:`ControlClient.call`."""
    return ControlClient(path).call(cmd, args)


__all__ = ["ControlClient", "ControlDenied", "ControlError", "call"]
