"""The control socket server: a thread in the daemon answering nbankctl.

**Who may connect.** Every connection's peer credentials are read with
``SO_PEERCRED`` (the kernel's word, not the client's). The peer's user name and
groups are looked up with :mod:`pwd`/:mod:`grp` (primary group from the
credentials, supplementary groups from the group database via
``os.getgrouplist``), never from ``/proc`` (systemd's ``ProtectProc`` hides it).
A request is allowed when one of ``control.readers`` (read-only commands) or
``control.admins`` (everything) names the user or one of those groups; root and
the daemon's own user are always admins. Denials are answered with the error
``denied`` and logged as warnings.

**The socket file.** It is bound inside a private (0700) temporary folder next
to its final path, made mode 0660 there, then hard-linked into place (which
never replaces anything) -- so it never exists with looser permissions, and
the process-wide umask is never touched while worker threads create files.
When the configuration names exactly one group among readers and admins, the
socket is given to that group so its members can connect; otherwise it keeps
the daemon's group. Either way **the permissions of the socket's folder decide
who can reach it at all** (systemd's ``RuntimeDirectory=`` with
``RuntimeDirectoryMode=0755`` is the usual choice); peer credentials then decide
what each connected user may do. A socket file left by a crash (connecting is
refused) is replaced; a socket a live daemon answers on makes start-up fail
with :class:`ControlSocketInUse`. The file is removed at shutdown if it is still
ours.

**Robustness.** Peer credentials are checked at accept, before anything is
read: a peer that is neither a reader nor an admin is answered ``denied`` and
closed at once, so it never holds a slot. Each accepted connection is served by
a short-lived thread with one deadline for the whole request
(:data:`READ_TIMEOUT`, however slowly it trickles in), a write timeout and a
request size limit (:data:`~.protocol.MAX_REQUEST`). At most
:data:`MAX_CONNECTIONS` are served at once (others get ``busy``), and
:data:`ADMIN_RESERVED` of those slots are kept for admins, so connections of
readers can never lock an admin out. Nothing a client sends can stop the
server: every failure becomes an error reply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import pwd
import selectors
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.config import ControlConfig
from nbankd.control import protocol

log = structlog.get_logger("nbankd.control")

READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
MAX_CONNECTIONS = 32
ADMIN_RESERVED = 4  # of MAX_CONNECTIONS, only for admins
DENIAL_LOG_EVERY = 10.0  # seconds between warnings about one refused user
SOCKET_MODE = 0o660
_UCRED = struct.Struct("3i")  # pid, uid, gid


class ControlSocketInUse(errors.ConfigError):
    """Another live process answers on the configured control socket."""

    code = "control-socket-in-use"


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    user: str
    groups: tuple[str, ...]
    admin: bool = False  # decided by Access at accept

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        return cls.lookup(pid, uid, gid)

    @classmethod
    def lookup(cls, pid: int, uid: int, gid: int) -> Peer:
        """Resolves names: the user's, its primary group's and its supplementary groups'."""
        gids = {gid}
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            user = f"uid {uid}"
        else:
            user = pw.pw_name
            gids.add(pw.pw_gid)
            try:
                gids.update(os.getgrouplist(user, pw.pw_gid))
            except OSError:
                gids.update(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)
        names = []
        for g in sorted(gids):
            try:
                names.append(grp.getgrgid(g).gr_name)
            except KeyError:
                continue
        return cls(pid=pid, uid=uid, gid=gid, user=user, groups=tuple(names))


class Access:
    """Decides what a peer may run, from ``control.readers`` and ``control.admins``."""

    def __init__(self, control: Callable[[], ControlConfig], daemon_uid: int | None = None):
        self.control = control
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid

    def _matches(self, peer: Peer, names: tuple[str, ...]) -> bool:
        return peer.user in names or any(g in names for g in peer.groups)

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid in (0, self.daemon_uid):
            return True
        return self._matches(peer, self.control().admins)

    def may_connect(self, peer: Peer) -> bool:
        """True when the peer may run at least the read-only commands."""
        return self.is_admin(peer) or self._matches(peer, self.control().readers)

    def allowed(self, peer: Peer, cmd: str) -> bool:
        if self.is_admin(peer):
            return True
        return cmd in protocol.READ_COMMANDS and self._matches(peer, self.control().readers)

    def denial(self, peer: Peer, cmd: str | None) -> str:
        """The message for a refused command (``None``: refused at connection)."""
        control = self.control()
        if cmd is None or cmd in protocol.READ_COMMANDS:
            who = f"readers: {', '.join(control.readers) or 'none'}; "
            who += f"admins: {', '.join(control.admins) or 'none'}"
        else:
            who = f"admins: {', '.join(control.admins) or 'none'}"
        what = "use the control socket" if cmd is None else f"run {cmd!r}"
        return f"user {peer.user} may not {what} ({who})"


def socket_group(control: ControlConfig) -> int | None:
    """The one group named among readers and admins (not root), if exactly one."""
    gids = set()
    for name in (*control.readers, *control.admins):
        if name == "root":
            continue
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(name).gr_gid)
    return gids.pop() if len(gids) == 1 else None


Dispatch = Callable[[str, dict[str, Any], Peer], Any]


class ControlServer:
    """Serves the control protocol on ``path`` until :meth:`stop`."""

    def __init__(self, path: Path, dispatch: Dispatch, access: Access) -> None:
        self.path = Path(path)
        self.dispatch = dispatch
        self.access = access
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS - ADMIN_RESERVED)
        self._admin_slots = threading.BoundedSemaphore(ADMIN_RESERVED)
        self._refusals_logged: dict[int, float] = {}  # uid -> when last logged

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Binds the socket (replacing a stale one) and starts serving."""
        self._listener = self._bind()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening", socket=str(self.path))

    def stop(self, timeout: float = 5.0) -> None:
        """Stops accepting, waits for the server thread, removes the socket file if ours."""
        if self._listener is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        self._listener.close()
        self._listener = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -- binding ------------------------------------------------------------------

    def _clear_stale(self) -> None:
        """Removes a socket file nobody answers on; refuses when one answers."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise errors.ConfigError(
                f"control_socket {self.path} exists and is not a socket",
                hint="remove it or configure another control_socket",
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            log.info("replacing a stale control socket", socket=str(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            raise errors.ConfigError(
                f"cannot check control_socket {self.path}: {err.strerror or err}"
            ) from err
        finally:
            probe.close()
        raise ControlSocketInUse(
            f"another nbankd is already running on control socket {self.path}",
            hint="stop it first, or give this daemon another control_socket",
        )

    def _bind(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        private = tempfile.mkdtemp(prefix=".nbankd-sock-", dir=self.path.parent)  # mode 0700
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tmp = os.path.join(private, "s")
            sock.bind(tmp)
            os.chmod(tmp, SOCKET_MODE)
            gid = socket_group(self.access.control())
            if gid is not None and gid != os.getegid():
                try:
                    os.chown(tmp, -1, gid)
                except PermissionError:
                    log.warning(
                        "cannot give the control socket to the configured group",
                        socket=str(self.path),
                        group=grp.getgrgid(gid).gr_name,
                        hint="make the daemon's user a member of that group",
                    )
            sock.listen(16)
            try:
                os.link(tmp, self.path)
            except FileExistsError:  # someone bound it since the check: decide again
                self._clear_stale()
                os.link(tmp, self.path)
            st = os.lstat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            raise
        finally:
            shutil.rmtree(private, ignore_errors=True)
        sock.setblocking(False)
        return sock

    # -- serving ------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                try:
                    events = sel.select()
                except OSError:  # pragma: no cover - EINTR is retried by Python
                    continue
                if self._stop.is_set():
                    break
                for key, _ in events:
                    if key.fileobj is self._listener:
                        self._accept()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.error("control socket accept failed", error=str(err))
            return
        conn.setblocking(True)
        conn.settimeout(1.0)  # the short replies sent from this thread
        try:
            peer = Peer.of(conn)
        except (OSError, KeyError) as err:
            with contextlib.suppress(OSError):
                conn.sendall(
                    protocol.encode_error(
                        "internal", f"peer credentials: {err}", exit_code=errors.EXIT_PROBLEMS
                    )
                )
            conn.close()
            return
        admin = self.access.is_admin(peer)
        peer = dataclasses.replace(peer, admin=admin)
        if not admin and not self.access.may_connect(peer):
            now = time.monotonic()
            if now - self._refusals_logged.get(peer.uid, -DENIAL_LOG_EVERY) >= DENIAL_LOG_EVERY:
                self._refusals_logged[peer.uid] = now
                log.warning(
                    "control connection refused", user=peer.user, uid=peer.uid, pid=peer.pid
                )
            with contextlib.suppress(OSError):
                conn.sendall(
                    protocol.encode_error(
                        "denied", self.access.denial(peer, None), exit_code=errors.EXIT_USAGE
                    )
                )
            conn.close()
            return
        slots = self._slots
        if not slots.acquire(blocking=False):
            slots = self._admin_slots
            if not admin or not slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(
                        protocol.encode_error(
                            "busy",
                            "too many control connections; retry",
                            exit_code=errors.EXIT_UNREACHABLE,
                        )
                    )
                conn.close()
                return
        try:
            threading.Thread(
                target=self._handle, args=(conn, peer, slots), name="control-conn", daemon=True
            ).start()
        except BaseException:
            slots.release()
            conn.close()
            raise

    def _handle(self, conn: socket.socket, peer: Peer, slots: threading.BoundedSemaphore) -> None:
        try:
            with conn:
                reply = self._answer(conn, peer)
                conn.settimeout(WRITE_TIMEOUT)
                with contextlib.suppress(OSError):
                    conn.sendall(reply)
        except Exception:  # never let one connection take the server down
            log.exception("control connection failed")
        finally:
            slots.release()

    def _answer(self, conn: socket.socket, peer: Peer) -> bytes:
        try:
            line = _read_line(conn)
            request = protocol.decode_request(line)
        except protocol.ProtocolError as err:
            return protocol.encode_error(err.code, err.message, exit_code=err.exit_code)
        if not self.access.allowed(peer, request.cmd):
            message = self.access.denial(peer, request.cmd)
            log.warning(
                "control request denied",
                user=peer.user,
                uid=peer.uid,
                pid=peer.pid,
                command=request.cmd,
            )
            return protocol.encode_error("denied", message, exit_code=errors.EXIT_USAGE)
        if request.cmd in protocol.ADMIN_COMMANDS:
            log.info("control command", user=peer.user, uid=peer.uid, command=request.cmd)
        try:
            return protocol.encode_result(self.dispatch(request.cmd, request.args, peer))
        except protocol.ProtocolError as err:
            return protocol.encode_error(
                err.code, err.message, err.details, exit_code=err.exit_code
            )
        except errors.NbankdError as err:
            return protocol.encode_error(err.code, str(err), exit_code=err.exit_code)
        except Exception as err:
            log.exception("control command failed", command=request.cmd)
            return protocol.encode_error(
                "internal", f"{type(err).__name__}: {err}", exit_code=errors.EXIT_PROBLEMS
            )


def _read_line(conn: socket.socket) -> bytes:
    """One request line, whole within :data:`READ_TIMEOUT` and the size limit."""
    deadline = time.monotonic() + READ_TIMEOUT
    buf = bytearray()
    while True:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            conn.settimeout(remaining)
            chunk = conn.recv(8192)
        except TimeoutError:
            raise protocol.ProtocolError(
                "bad-request", f"no complete request within {READ_TIMEOUT:g} s"
            ) from None
        except OSError as err:
            if err.errno in (errno.ECONNRESET, errno.EPIPE):
                raise protocol.ProtocolError("bad-request", "connection closed") from None
            raise
        if not chunk:
            if not buf:
                raise protocol.ProtocolError("bad-request", "empty request")
            return bytes(buf)
        end = chunk.find(b"\n")
        if end >= 0:
            buf += chunk[:end]
            if len(buf) > protocol.MAX_REQUEST:
                break
            return bytes(buf)
        buf += chunk
        if len(buf) > protocol.MAX_REQUEST:
            break
    raise protocol.ProtocolError("too-large", f"request longer than {protocol.MAX_REQUEST} bytes")


__all__ = ["Access", "ControlServer", "ControlSocketInUse", "Peer", "socket_group"]
