"""How a metadata reader's child process is confined and ended (see
:mod:`nbankd.metadata_readers`, which runs it).

The child program (:data:`CHILD`, run as ``python -I -c``) makes itself a subreaper,
limits its memory, puts itself in a Landlock domain that lets it write only beneath a
private scratch folder (:func:`landlock_rules`), loads the plugin, runs it, ends every
process it started and answers in JSON. The parent gives it a scrubbed environment
(:func:`reader_environment`), compares the file's status before and after
(:func:`snapshot`, :func:`change`) and ends what is left (:func:`end_tree`,
:func:`kill_group`). :func:`reader_confinement` says whether a reader run here is
confined in full, and why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import signal
import stat
import subprocess
from typing import Any

from nbankd import seams

# The child: makes itself a subreaper, limits and confines itself (Landlock, when
# the request carries a ruleset: it must then succeed), loads the entry point, runs
# it, ends every process the reader started, and writes one JSON answer to the
# descriptor that was its standard output (the plugin's own output goes to standard
# error). Kept free of nbankd imports.
CHILD = r"""
import ctypes, json, os, resource, signal, sys, time
request = json.loads(sys.argv[1])
sys.path[:] = request["path"]
answer_fd = os.dup(1)
os.dup2(2, 1)
me = os.getpid()
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

def children(pid):
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids

def end_descendants():
    # every process below this one is killed and reaped; one orphaned meanwhile (its
    # parent killed) comes back to this subreaper and is found at the next round
    for _ in range(1000):
        todo, found = [me], []
        while todo:
            kids = children(todo.pop())
            found += kids
            todo += kids
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.001)

def answer(**reply):
    if os.getpid() != me:  # a process the reader forked, leaving through here
        os._exit(1)
    end_descendants()
    data = json.dumps(reply, allow_nan=False).encode()
    while data:
        data = data[os.write(answer_fd, data):]
    os._exit(0)

def failed(call):
    return f"{call}: {os.strerror(ctypes.get_errno())}"

def confine(rules):
    # a Landlock domain denying the handled accesses but beneath the scratch folder
    # (and writing /dev/null); no_new_privs first, as landlock_restrict_self needs
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return failed("prctl(PR_SET_NO_NEW_PRIVS)")
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (ABI 4),
    # scoped (ABI 6); only as long as the kernel knows it
    fields = [rules["handled"]] + ([0, rules["scoped"]] if rules["scoped"] else [])
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = libc.syscall(
        ctypes.c_long(444), ctypes.byref(attr), ctypes.c_size_t(8 * len(fields)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        return failed("landlock_create_ruleset")

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for where, allowed in ((rules["scratch"], rules["handled"]), ("/dev/null", rules["file"])):
        try:
            fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
        except OSError as err:
            if where == "/dev/null":
                continue
            return f"{where}: {err.strerror}"
        rule = Beneath(allowed, fd)
        added = libc.syscall(
            ctypes.c_long(445), ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
        why = failed("landlock_add_rule") if added != 0 else None
        os.close(fd)
        if why:
            return why
    if libc.syscall(ctypes.c_long(446), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return failed("landlock_restrict_self")
    os.close(ruleset)
    return None

def too_deep(value, limit):
    todo = [(value, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            if depth >= limit:
                return True
            todo += [(v, depth + 1) for v in value]
    return False

libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the reader come here
limit = request["memory"]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
confined = request["landlock"] is not None
if confined:
    why = confine(request["landlock"])
    if why is not None:
        answer(status="unavailable", message=f"was not run: it could not be confined ({why})")
dtype = request["dtype"]
try:
    from importlib.metadata import entry_points
    found = [ep for ep in entry_points(group=request["group"]) if ep.name == dtype]
    if not found:
        answer(status="no-reader")
    if len(found) > 1:
        answer(status="unavailable", message=f"more than one metadata reader for {dtype!r}")
    reader = found[0].load()
except MemoryError:
    answer(status="unavailable", message="loading it needed more memory than allowed")
except BaseException as err:
    answer(status="unavailable", message=f"cannot be loaded: {type(err).__name__}: {err}")
if not callable(reader):
    answer(status="unavailable", message=f"{found[0].value} is not callable")
try:
    result = reader(request["file"])
except MemoryError:
    answer(status="unavailable", message="needed more memory than allowed")
except ValueError as err:
    answer(status="invalid", message=str(err) or type(err).__name__)
except BaseException as err:
    denied = confined and isinstance(err, PermissionError)
    answer(
        status="unavailable",
        message=f"failed: {type(err).__name__}: {err}"
        + (" (a reader may write only in its $TMPDIR)" if denied else ""),
    )
if not isinstance(result, dict):
    answer(status="unavailable", message=f"returned {type(result).__name__}, not a dict")
out = {}
for key, value in result.items():
    if not isinstance(key, str):
        answer(status="unavailable", message=f"returned a key that is not text: {key!r}")
    if value is None:
        continue
    if too_deep(value, request["nesting"]):
        answer(
            status="unavailable",
            message=f"returned a value for {key!r} nested deeper than "
            f"{request['nesting']} levels",
        )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        answer(
            status="unavailable",
            message=f"returned a value for {key!r} that cannot be registered: "
            f"{value!r} ({type(value).__name__})",
        )
    out[key] = value
answer(status="read", metadata=out)
"""


# Landlock (linux/landlock.h): system call numbers (the same on every architecture)
# and the filesystem accesses a ruleset may handle.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13
_FS_TRUNCATE = 1 << 14
#: the filesystem accesses that change something, by the Landlock ABI that can deny
#: them: a reader is denied every one its kernel knows, except beneath its scratch
#: folder. Reading, listing and executing are never handled (a reader may read
#: anything), nor is IOCTL_DEV (ABI 5: ioctl on an opened device, which acquisition
#: and GPU libraries use; a device opened read-only is not written through it).
LANDLOCK_WRITES: tuple[tuple[int, int], ...] = (
    (
        1,
        _FS_WRITE_FILE
        | _FS_REMOVE_DIR
        | _FS_REMOVE_FILE
        | _FS_MAKE_CHAR
        | _FS_MAKE_DIR
        | _FS_MAKE_REG
        | _FS_MAKE_SOCK
        | _FS_MAKE_FIFO
        | _FS_MAKE_BLOCK
        | _FS_MAKE_SYM,
    ),
    (2, _FS_REFER),
    (3, _FS_TRUNCATE),
)
#: Landlock's scopes (ABI 6, Linux 6.12): what a reader may not reach outside its own
#: processes
_SCOPES_ABI = 6
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1
#: of those, what may be allowed on a file (not a folder): ``/dev/null`` is writable
_LANDLOCK_FILE_WRITES = _FS_WRITE_FILE | _FS_TRUNCATE
#: the ABI whose confinement counts as full: ABI 1 and 2 cannot deny truncate()
_FULL_ABI = 3
#: how to have Landlock, told with a reader that cannot be confined
LANDLOCK_HINT = (
    "Landlock ABI 3 needs Linux 6.2 or later with landlock in its lsm= boot list, and "
    "the landlock_* system calls allowed by the service's SystemCallFilter="
)
#: the environment variables a reader is given as they are (TMPDIR and HOME are its
#: scratch folder; nothing else of the daemon's reaches it)
_KEPT_ENVIRONMENT = ("PATH", "LANG")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> tuple[int, str]:
    """The Landlock ABI version this kernel gives this process (0: none) and, when
    none, why (the kernel has none, it is disabled, a system call filter refuses it,
    or the test seam ``NBANKD_READER_UNCONFINED`` says so)."""
    if seams.reader_unconfined():
        return 0, f"Landlock is turned off by the test seam {seams.READER_UNCONFINED}=1"
    abi = _libc().syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    if abi > 0:
        return int(abi), ""
    code = ctypes.get_errno()
    why = {
        errno.ENOSYS: "this kernel has no Landlock (Linux 5.13 or later built with it has)",
        errno.EOPNOTSUPP: "Landlock is disabled in this kernel (landlock is missing from "
        "its lsm= boot list)",
        errno.EPERM: "a system call filter refuses Landlock (the systemd unit's "
        "SystemCallFilter= must allow landlock_create_ruleset, landlock_add_rule and "
        "landlock_restrict_self)",
    }.get(code, f"Landlock cannot be used: {os.strerror(code)}")
    return 0, why


def reader_confinement() -> str | None:
    """None when a metadata reader run here is confined in full (Landlock ABI 3 or
    later: it cannot write, truncate, rename or remove the file it reads), else why
    not, for a message. An unconfined reader is never handed a recording's only copy
    (see ``only_copy`` of :func:`read_file_metadata`)."""
    abi, why = landlock_abi()
    if abi == 0:
        return why
    if abi < _FULL_ABI:
        return f"this kernel's Landlock (ABI {abi}) cannot deny truncate(); ABI 3 (Linux 6.2) can"
    return None


def landlock_rules(scratch: str) -> dict[str, Any] | None:
    """The child's Landlock request: the accesses its kernel can deny, allowed beneath
    ``scratch`` (and writing /dev/null); None where Landlock is unavailable."""
    abi, _ = landlock_abi()
    if abi == 0:
        return None
    handled = 0
    for since, accesses in LANDLOCK_WRITES:
        if abi >= since:
            handled |= accesses
    return {
        "handled": handled,
        "file": handled & _LANDLOCK_FILE_WRITES,
        "scratch": scratch,
        # from ABI 6: no signal to a process outside the reader's own (nbankd: killed or
        # stopped, every deposit with it), no abstract socket of another domain
        "scoped": _SCOPE_SIGNAL | _SCOPE_ABSTRACT_UNIX_SOCKET if abi >= _SCOPES_ABI else 0,
    }


def reader_environment(scratch: str) -> dict[str, str]:
    """The reader's environment: PATH and the locale (LANG, LC_*) as they are, TMPDIR
    and HOME its scratch folder, and nothing else of the daemon's (credentials, tokens,
    the registry's address)."""
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENVIRONMENT or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    env["TMPDIR"] = env["HOME"] = scratch
    return env


Snapshot = tuple[tuple[Any, ...], ...]


def snapshot(fd: int) -> Snapshot:
    """What tells that the file open as ``fd`` changed: its inode, size, modification
    and change times and links; for a folder, those of every entry below it too."""
    st = os.fstat(fd)
    own = (".", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
    if not stat.S_ISDIR(st.st_mode):
        return (own,)
    entries = [own]
    for top, dirs, files, at in os.fwalk(".", dir_fd=fd):
        for name in sorted(dirs + files):
            with contextlib.suppress(OSError):
                e = os.stat(name, dir_fd=at, follow_symlinks=False)
                entries.append(
                    (
                        os.path.join(top, name),
                        e.st_ino,
                        e.st_size,
                        e.st_mtime_ns,
                        e.st_ctime_ns,
                        e.st_nlink,
                    )
                )
    return tuple(entries)


def change(before: Snapshot, after: Snapshot, *, confined: bool) -> str:
    """How ``after`` differs from ``before`` (:func:`snapshot`), in words (``confined``:
    the reader could not write, so times and modes are what it changed)."""
    if len(before) > 1 or len(after) > 1:
        return "an entry of the folder was added, removed or written"
    _, _, size, mtime, _, links = before[0]
    _, _, size2, mtime2, _, links2 = after[0]
    if links2 == 0:
        return "it was removed"
    if size != size2:
        return f"its size went from {size} to {size2} bytes"
    if links != links2:
        return "it was given another name"
    if confined:  # no write could have got through
        if mtime != mtime2:
            return "its modification time was set (os.utime or touch)"
        return "its mode, times or attributes were set (chmod, utime, setxattr)"
    if mtime != mtime2:
        return "it was written, or its modification time set"
    return "its status changed (written, its times, mode or attributes set)"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (any of its threads), as /proc lists them."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError),
                open(f"/proc/{pid}/task/{task}/children", "rb") as f,
            ):
                kids += [int(k) for k in f.read().split()]
    return kids


def _parent_if_alive(pid: int) -> int | None:
    """``pid``'s parent, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else int(fields[1])


def end_tree(root: int) -> None:
    """Kills every live process below ``root`` (the reader's child, still running at
    its deadline: a subreaper, so the orphans of those killed come back under it and
    are found at the next round). Each is signalled through a pidfd after checking
    it is still where it was found, so a number reused meanwhile is never hit."""
    for _ in range(100):
        found: list[tuple[int, int]] = []
        todo = [root]
        while todo:
            parent = todo.pop()
            for kid in _children(parent):
                found.append((kid, parent))
                todo.append(kid)
        hit = False
        for kid, parent in found:
            try:
                handle = os.pidfd_open(kid)
            except OSError:
                continue
            try:
                if _parent_if_alive(kid) in (parent, root):
                    signal.pidfd_send_signal(handle, signal.SIGKILL)
                    hit = True
            except OSError:
                pass
            finally:
                os.close(handle)
        if not hit:
            return


def kill_group(child: subprocess.Popen[bytes]) -> None:
    """Kills the child's process group and reaps the child.

    Every process the reader starts is ended by the child itself before it answers
    (it is a subreaper: :data:`CHILD`), and at the deadline by :func:`end_tree`
    before this kill. What can still escape: a process started in a session of its own
    by a reader whose interpreter then ended without answering (``os._exit``, a crash:
    its orphans go to init), one forked in the instant between :func:`end_tree`'s last
    round and this kill, and anything the reader asks another service to start
    (``systemd-run``, ``at``). None of them can write the file read (Landlock)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
