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

**Robustness.** Peer credentials are checked before anything is read: a peer
that is neither a reader nor an admin is answered ``denied`` and closed at once, so
it never holds a slot. The accept thread only accepts (every pending connection at
each wake-up, from a listen queue of :data:`LISTEN_BACKLOG`) and reads credentials:
user and group names, which may come from a directory service that hangs, are
looked up in threads of their own (at most :data:`~.peers.MAX_LOOKUPS` users at once,
:data:`~.peers.MAX_WAITING_LOOKUP` connections waiting for one user's) and kept
:data:`~.peers.NAMES_TTL` seconds, so a flood of connections costs one lookup, and a slow
lookup delays only the connections of its user. Each accepted connection is served by
a short-lived thread with one deadline for the whole request
(:data:`READ_TIMEOUT`, however slowly it trickles in), a write timeout and a
request size limit (:data:`~.protocol.MAX_REQUEST`). At most
:data:`MAX_CONNECTIONS` are served at once (others get ``busy``), and
:data:`ADMIN_RESERVED` of those slots are kept for admins, so connections of
readers can never lock an admin out. Nothing a client sends can stop the
server: every failure becomes an error reply.

**Out of descriptors or threads.** When ``accept()`` fails for want of a descriptor
(EMFILE, ENFILE), the server gives up the daemon's spare descriptor
(:data:`nbankd.service.limits.SPARE`, opened first at start-up so its number is low)
and accepts into it: the connection is served (``nbankctl status`` answers, degraded,
naming the open-file limit) and the spare is taken back once it is closed. When even
that fails, the listening socket is left alone for :data:`ACCEPT_BACKOFF` seconds (the
connections wait in the kernel's queue) and the failure is logged once, not at every
wake-up. A connection whose serving thread cannot be started is answered
``thread-limit`` from the accepting thread, never closed without a word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.control import protocol
from nbankd.control.peers import Access, Peer, PeerNames, credentials, socket_group
from nbankd.service.limits import SPARE, SpareDescriptor

log = structlog.get_logger("nbankd.control")

READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
MAX_CONNECTIONS = 32
ADMIN_RESERVED = 4  # of MAX_CONNECTIONS, only for admins
LISTEN_BACKLOG = 1024  # connections the kernel queues before connect() says EAGAIN
ACCEPT_BATCH = 256  # connections accepted per wake-up before checking for stop
DENIAL_LOG_EVERY = 10.0  # seconds between warnings about one refused user
ACCEPT_BACKOFF = 1.0  # seconds the listener is left alone after accept() failed
SOCKET_MODE = 0o660


class ControlSocketInUse(errors.ConfigError):
    """Another live process answers on the configured control socket."""

    code = "control-socket-in-use"


Dispatch = Callable[[str, dict[str, Any], Peer], Any]


class ControlServer:
    """Serves the control protocol on ``path`` until :meth:`stop`."""

    def __init__(
        self, path: Path, dispatch: Dispatch, access: Access, spare: SpareDescriptor = SPARE
    ) -> None:
        self.path = Path(path)
        self._spare = spare
        self._selector: selectors.BaseSelector | None = None
        self._resume_at: float | None = None  # accept() failed: the listener rests until
        self._accept_error: str | None = None  # the failure of accept() last logged
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
        self._refusals_lock = threading.Lock()
        self._names = PeerNames(self._named)

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Binds the socket (replacing a stale one) and starts serving. Everything the
        serving thread needs is made here, so that a failure (no descriptor or thread
        left) fails the start instead of leaving a daemon without its control server."""
        self._listener = self._bind()
        try:
            self._wake_r, self._wake_w = os.pipe()
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._listener, selectors.EVENT_READ)
            self._selector.register(self._wake_r, selectors.EVENT_READ)
            self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
            self._thread.start()
        except BaseException as err:
            self._stop.set()
            self.stop()
            if errors.out_of_descriptors(err):
                assert isinstance(err, OSError)
                raise errors.open_file_limit(err, "starting the control socket") from err
            if errors.thread_refused(err):
                raise errors.thread_limit("starting the control socket") from err
            raise
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
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r, self._wake_w = -1, -1
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
            sock.listen(LISTEN_BACKLOG)
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
        sel, listener = self._selector, self._listener
        assert sel is not None and listener is not None
        while not self._stop.is_set():
            timeout = None
            if self._resume_at is not None:  # resting after a failed accept()
                timeout = self._resume_at - time.monotonic()
                if timeout <= 0:
                    self._resume_at, timeout = None, None
                    sel.register(listener, selectors.EVENT_READ)
            try:
                events = sel.select(timeout)
            except OSError:  # pragma: no cover - EINTR is retried by Python
                continue
            if self._stop.is_set():
                break
            for key, _ in events:
                if key.fileobj is listener:
                    self._accept_pending()

    def _accept(self) -> socket.socket:
        """One waiting connection; out of descriptors, accepted into the spare's."""
        assert self._listener is not None
        self._spare.hold()  # taken back once the connection it served is closed
        try:
            return self._listener.accept()[0]
        except OSError as err:
            if not errors.out_of_descriptors(err) or not self._spare.release():
                raise
        return self._listener.accept()[0]

    def _accept_failed(self, err: OSError) -> None:
        """Leaves the listener alone for ACCEPT_BACKOFF seconds (the connections wait
        in the kernel's queue), logging the failure once until accept() works again."""
        assert self._selector is not None and self._listener is not None
        if self._resume_at is None:
            self._selector.unregister(self._listener)
        self._resume_at = time.monotonic() + ACCEPT_BACKOFF
        problem = errors.process_limit_problem(err, "accepting a control connection")
        if str(err) != self._accept_error:
            self._accept_error = str(err)
            log.error(
                "control socket accept failed; connections wait",
                error=problem or str(err),
                retry_every=ACCEPT_BACKOFF,
            )

    def _accept_pending(self) -> None:
        """Accepts the connections waiting (up to ACCEPT_BATCH, then the stop flag is
        looked at again), so the listen queue drains as fast as clients fill it."""
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn = self._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._accept_failed(err)
                return
            if self._accept_error is not None:
                log.info("control socket accepts connections again")
                self._accept_error = None
            try:
                self._admit(conn)
            except Exception:  # never let one connection stop the accepting
                log.exception("control connection failed at accept")
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        """Reads the peer's credentials; decides at once when its names are known, else
        hands the connection to a name lookup (never made on this thread)."""
        conn.setblocking(True)
        conn.settimeout(1.0)  # the short replies sent from this thread
        try:
            pid, uid, gid = credentials(conn)
        except OSError as err:
            self._named(conn, None, err)
            return
        peer = self._names.known(pid, uid, gid)
        if peer is not None:
            self._decide(conn, peer)
        else:
            try:
                queued = self._names.look_up(conn, pid, uid, gid)
            except RuntimeError as err:
                if not errors.thread_refused(err):
                    raise
                self._refuse_no_thread(conn)
                return
            if not queued:
                self._refuse_busy(conn)

    def _named(self, conn: socket.socket, peer: Peer | None, error: Exception | None) -> None:
        """A connection whose peer is known now (or could not be: ``error``)."""
        if peer is None or self._stop.is_set():
            with contextlib.suppress(OSError):
                if peer is None:
                    conn.sendall(
                        protocol.encode_error(
                            "internal",
                            f"cannot tell who is connecting (peer credentials: {error}); "
                            "see nbankd's log",
                            exit_code=errors.EXIT_PROBLEMS,
                        )
                    )
            conn.close()
            if peer is None:
                log.error("control peer credentials failed", error=repr(error))
            return
        self._decide(conn, peer)

    def _refuse_busy(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(
                protocol.encode_error(
                    "busy",
                    "too many control connections; retry",
                    exit_code=errors.EXIT_UNREACHABLE,
                )
            )
        conn.close()

    def _decide(self, conn: socket.socket, peer: Peer) -> None:
        """Refuses the connection, or serves it in a thread of its own from a slot."""
        admin = self.access.is_admin(peer)
        peer = dataclasses.replace(peer, admin=admin)
        if not admin and not self.access.may_connect(peer):
            now = time.monotonic()
            with self._refusals_lock:
                last = self._refusals_logged.get(peer.uid, -DENIAL_LOG_EVERY)
                quiet = now - last < DENIAL_LOG_EVERY
                if not quiet:
                    self._refusals_logged[peer.uid] = now
            if not quiet:
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
                self._refuse_busy(conn)
                return
        try:
            threading.Thread(
                target=self._handle, args=(conn, peer, slots), name="control-conn", daemon=True
            ).start()
        except BaseException as err:
            slots.release()
            if errors.thread_refused(err):
                self._refuse_no_thread(conn)
                return
            conn.close()
            raise

    def _refuse_no_thread(self, conn: socket.socket) -> None:
        """Answers, from the accepting thread, a connection no thread can serve."""
        err = errors.thread_limit("serving a control connection")
        log.error("control connection refused: no thread to serve it", error=str(err))
        with contextlib.suppress(OSError):
            conn.sendall(
                protocol.encode_error(err.code, str(err), exit_code=errors.EXIT_UNREACHABLE)
            )
        conn.close()

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
            self._spare.hold()  # given up to accept this connection: its number is free

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
            limit = errors.process_limit_problem(err, f"answering {request.cmd}")
            if limit is not None:
                log.error("control command failed", command=request.cmd, error=limit)
                return protocol.encode_error(
                    "process-limit", limit, exit_code=errors.EXIT_UNREACHABLE
                )
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


__all__ = [
    "Access",
    "ControlServer",
    "ControlSocketInUse",
    "Peer",
    "PeerNames",
    "credentials",
    "socket_group",
]
