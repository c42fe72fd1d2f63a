"""Metadata readers: neurobank 0.13's plugins, run as someone else's code.

A reader is an entry point in the group ``nbank.metadata_readers`` named for the
datatype it reads: a function ``path -> dict`` that raises ValueError when the file
is not a valid file of that datatype. nbankd and ``nbankctl deposit`` run the same
plugins with the same rules as ``nbank deposit``, but never in their own process:
:func:`read_file_metadata` runs the reader in a child Python with a time limit and an
address-space limit (``RLIMIT_AS``), confined, and answers with a :class:`ReaderResult`:

- ``read``: the file's metadata (keys whose value is None left out, as nbank does);
- ``no-reader``: no installed package has a reader for the datatype;
- ``invalid``: the reader rejected the file (its ValueError's message): the file's fault;
- ``unavailable``: the reader could not be loaded, is ambiguous, crashed, ran out of
  time or memory, returned something that cannot be registered, or cannot be
  confined where the file is a recording's only copy: an operational problem, never
  the file's fault (the input waits);
- ``changed``: the file (or folder) read was changed while the reader ran: never
  deposited as read (a staged copy is staged anew; the input itself goes back).

Confinement: a reader may read anything the daemon may, and write only beneath a
private scratch folder made for the call (its ``$TMPDIR``, ``$HOME`` and working
folder, removed afterwards) and into ``/dev/null``: the child puts itself in a
Landlock domain (:data:`LANDLOCK_WRITES`) before it loads the plugin, so the file it
is handed cannot be written, truncated, renamed or removed, whatever path it is
reached by. Its environment holds only ``PATH``, ``LANG``/``LC_*``, ``TMPDIR`` and
``HOME``, and every process it starts is ended before it answers (the child is a
subreaper). Where the kernel gives no Landlock (or an ABI older than 3, which cannot
deny truncate()), :func:`reader_confinement` says why, the reader runs unconfined,
and callers never hand it a recording's only copy (``only_copy``). Whatever the
confinement, the file's status before and after the reader is compared (size,
modification and change times, links, inode; every entry of a folder): a change is
the reader's failure (``changed``).

:func:`merge_metadata` is the pure rule for combining the metadata given for a
deposit (inbox configuration, sidecar, command line) with the file's, under
``file_metadata: read | skip | override``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

from nbankd import errors, seams

ENTRY_POINT_GROUP = "nbank.metadata_readers"
FileMetadataMode = Literal["read", "skip", "override"]
FILE_METADATA_VALUES: tuple[str, ...] = ("read", "skip", "override")
Status = Literal["read", "no-reader", "invalid", "unavailable", "changed"]

#: seconds a reader may run on one file
DEFAULT_TIMEOUT = 120.0
#: bytes of address space the reader's process may map (its interpreter included)
DEFAULT_MEMORY = 4 << 30
#: bytes of the reader's standard error kept (its end, for the message)
_STDERR_TAIL = 2000
#: bytes of answer read from the reader's process; a larger one is no answer (the
#: metadata it could carry would be refused by the registry's limits anyway)
MAX_ANSWER = 4 << 20
#: levels of lists and objects a metadata value may nest (deeper is no answer: a
#: registry keeps metadata, not trees, and a parser's stack is finite)
MAX_NESTING = 32

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


class MetadataReaderUnavailable(errors.NbankdError):
    """The datatype's reader cannot be used now: the input waits (never rejected)."""

    code = "metadata-reader-unavailable"
    transient = True


class InvalidFile(errors.NbankdError):
    """The datatype's reader rejected the file."""

    code = "invalid-file"


class MetadataMismatch(errors.NbankdError):
    """Metadata given for the deposit differs from the file's."""

    code = "metadata-mismatch"


@dataclass(frozen=True)
class ReaderResult:
    """What running a datatype's reader on one file gave (see the module docstring)."""

    status: Status
    metadata: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""
    hint: str = ""  # for an unavailable reader: what to do, when not the usual advice

    def error(self) -> errors.NbankdError | None:
        """The error to raise for this result (None when the metadata was read or
        there is no reader)."""
        if self.status == "changed":  # its message says what to do
            return MetadataReaderUnavailable(self.message, hint=self.hint)
        if self.status == "unavailable" and self.hint:
            return MetadataReaderUnavailable(self.message, hint=self.hint)
        if self.status == "invalid":
            return InvalidFile(
                self.message,
                hint="fix or replace the file, or deposit it without its reader "
                "(inbox option file_metadata: skip; nbankctl deposit --no-file-metadata)",
            )
        if self.status == "unavailable":
            return MetadataReaderUnavailable(
                self.message,
                hint="install or repair the package providing the reader in nbankd's "
                "environment (inputs of this datatype wait until it works), or deposit "
                "without it (file_metadata: skip; nbankctl deposit --no-file-metadata)",
            )
        return None


def _dist_name(dist: importlib_metadata.Distribution | None, fallback: str) -> str:
    name = dist.metadata["Name"] if dist is not None else None
    return str(name) if name else fallback


def _stamp(path: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """The folders of the search path with their modification times: installing or
    removing a package changes its folder's."""
    out = []
    for entry in path:
        try:
            out.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            out.append((entry, -1))
    return tuple(out)


_INDEX_LOCK = threading.Lock()
_INDEX: dict[tuple[tuple[str, int], ...], dict[str, tuple[str, ...]]] = {}


def _readers_index(path: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{datatype: packages with a reader for it} over the packages on ``path``, read
    again only when a folder of the path changed."""
    stamp = _stamp(path)
    with _INDEX_LOCK:
        cached = _INDEX.get(stamp)
    if cached is not None:
        return cached
    seen: set[str] = set()
    index: dict[str, list[str]] = {}
    for dist in importlib_metadata.distributions(path=list(path)):
        package = _dist_name(dist, "")
        key = package.lower().replace("-", "_")
        if package and key in seen:  # the same package twice on the path: the first wins
            continue
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                index.setdefault(ep.name, []).append(package or ep.value)
    frozen = {dtype: tuple(packages) for dtype, packages in index.items()}
    with _INDEX_LOCK:
        if len(_INDEX) >= 16:
            _INDEX.clear()
        _INDEX[stamp] = frozen
    return frozen


def find_reader(dtype: str, search_path: Sequence[str] | None = None) -> str | None:
    """The package that provides ``dtype``'s reader (its entry point's value when the
    package has no name), or None; only package metadata is read, no plugin code runs.

    ``search_path``: where packages are looked for (default: this interpreter's
    sys.path). Raises :class:`MetadataReaderUnavailable` when several packages
    provide one.
    """
    found = _readers_index(list(search_path) if search_path is not None else sys.path)
    packages = found.get(dtype, ())
    if len(packages) > 1:
        raise MetadataReaderUnavailable(
            f"more than one metadata reader for {dtype!r}: {', '.join(sorted(packages))}",
            hint="uninstall all but one of these packages",
        )
    return packages[0] if packages else None


# The child: makes itself a subreaper, limits and confines itself (Landlock, when
# the request carries a ruleset: it must then succeed), loads the entry point, runs
# it, ends every process the reader started, and writes one JSON answer to the
# descriptor that was its standard output (the plugin's own output goes to standard
# error). Kept free of nbankd imports.
_CHILD = r"""
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


def _landlock_rules(scratch: str) -> dict[str, Any] | None:
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


def _reader_environment(scratch: str) -> dict[str, str]:
    """The reader's environment: PATH and the locale (LANG, LC_*) as they are, TMPDIR
    and HOME its scratch folder, and nothing else of the daemon's (credentials, tokens,
    the registry's address)."""
    env = {k: v for k, v in os.environ.items() if k in _KEPT_ENVIRONMENT or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    env["TMPDIR"] = env["HOME"] = scratch
    return env


_Snapshot = tuple[tuple[Any, ...], ...]


def _snapshot(fd: int) -> _Snapshot:
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


def _change(before: _Snapshot, after: _Snapshot, *, confined: bool) -> str:
    """How ``after`` differs from ``before`` (:func:`_snapshot`), in words (``confined``:
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


def read_file_metadata(
    dtype: str,
    path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory: int = DEFAULT_MEMORY,
    name: str | None = None,
    search_path: Sequence[str] | None = None,
    python: str = sys.executable,
    only_copy: bool = False,
) -> ReaderResult:
    """Runs ``dtype``'s reader on the file at ``path`` in a child process limited to
    ``timeout`` seconds and ``memory`` bytes of address space, confined (see the module
    docstring); never raises for the plugin's behaviour (see :class:`ReaderResult`).

    The file is opened here without following links and handed to the child open;
    the reader sees it under ``name`` (default: the name in ``path``), in a private
    folder, so a staged copy is read as the original file's name (its extension
    included). ``search_path``: where the child looks for packages (default: this
    interpreter's sys.path); ``python``: the interpreter that runs the child.
    ``only_copy``: the file is a recording's only copy (an input placed by rename,
    the user's own file): where the reader cannot be confined in full
    (:func:`reader_confinement`) it is not run: ``unavailable``, its message naming
    Landlock and the choices. Whatever the confinement, a file changed while the
    reader ran is ``changed``. Raises OSError only when ``path`` cannot be opened.
    """
    where = list(search_path) if search_path is not None else list(sys.path)
    try:
        package = find_reader(dtype, where)
    except MetadataReaderUnavailable as err:
        return ReaderResult("unavailable", message=err.message)
    if package is None:
        return ReaderResult("no-reader")
    label = f"the metadata reader for {dtype!r} (from {package})"
    shown = name or Path(os.fspath(path)).name
    if "/" in shown or shown in ("", ".", ".."):
        raise ValueError(f"{shown!r} is not a file name")
    if only_copy and (why := reader_confinement()) is not None:
        return ReaderResult(
            "unavailable",
            message=f"{label} is not run on {shown!r}, the recording's only copy, as it "
            f"cannot be confined here ({why}): give the inbox placement: copy (the reader "
            "then reads a copy) or file_metadata: skip",
            hint=LANDLOCK_HINT,
        )
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, fd)
        before = _snapshot(fd)
        top = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="nbankd-reader-", ignore_cleanup_errors=True)
        )
        shelf, scratch = os.path.join(top, "file"), os.path.join(top, "tmp")
        os.mkdir(shelf, 0o700)
        os.mkdir(scratch, 0o700)
        os.symlink(f"/proc/self/fd/{fd}", os.path.join(shelf, shown))
        request = {
            "path": where,
            "memory": int(memory),
            "dtype": dtype,
            "group": ENTRY_POINT_GROUP,
            "file": os.path.join(shelf, shown),
            "landlock": _landlock_rules(scratch),
            "nesting": MAX_NESTING,
        }
        child = subprocess.Popen(
            [python, "-I", "-c", _CHILD, json.dumps(request)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # only its end is kept: a chatty reader fills nothing
            start_new_session=True,  # its own process group: killed whole at the deadline
            close_fds=True,
            cwd=scratch,
            env=_reader_environment(scratch),
            pass_fds=(fd,),  # the same number in the child: the link above points at it
        )
        late = False
        try:
            out, err_tail = _answer(child, timeout)
        except subprocess.TimeoutExpired:
            _end_tree(child.pid)
            out, err_tail, late = b"", b"", True
        finally:
            _kill_group(child)  # what the reader may have started in the background
        after = _snapshot(fd)
        if after != before:  # whatever it answered
            return ReaderResult(
                "changed",
                message=f"{label} changed the file it was given to read "
                f"({_change(before, after, confined=request['landlock'] is not None)}): "
                "what it read is never deposited; fix the reader (it must open the file "
                "read-only and leave its times and mode alone), or do without it "
                "(file_metadata: skip)",
            )
        if late:
            return ReaderResult(
                "unavailable", message=f"{label} did not finish within {timeout:g} s"
            )
        tail = err_tail.decode("utf-8", "replace").strip()
    if out is None:
        return ReaderResult(
            "unavailable", message=f"{label} answered with more than {MAX_ANSWER >> 20} MiB"
        )
    try:
        reply = json.loads(out)
        status = reply["status"]
    except RecursionError:
        return ReaderResult("unavailable", message=f"{label} answered with JSON nested too deep")
    except (ValueError, KeyError, TypeError):
        how = (
            f"was killed by signal {-child.returncode}"
            if child.returncode < 0
            else f"exited with status {child.returncode}"
        )
        last = tail.splitlines()[-1] if tail else "no message"
        return ReaderResult("unavailable", message=f"{label} {how} without an answer ({last})")
    if status == "read" and isinstance(reply.get("metadata"), dict):
        return ReaderResult("read", metadata=reply["metadata"])
    if status == "no-reader":
        return ReaderResult("no-reader")
    if status == "invalid":
        return ReaderResult(
            "invalid", message=f"the {dtype} reader rejects the file: {reply.get('message')}"
        )
    return ReaderResult("unavailable", message=f"{label}: {reply.get('message', 'no answer')}")


def _answer(child: subprocess.Popen[bytes], timeout: float) -> tuple[bytes | None, bytes]:
    """What the child wrote on its standard output by the time it exited (None past
    :data:`MAX_ANSWER` bytes) and the last :data:`_STDERR_TAIL` bytes of its standard
    error. Their end is the child's exit, not the pipes' end of file: a process the
    reader left in the background may hold them open, and write on (it is killed with
    the group afterwards); what is read after the exit is bounded too. Raises
    TimeoutExpired when the child runs past ``timeout`` seconds."""
    assert child.stdout is not None and child.stderr is not None
    out, err = child.stdout.fileno(), child.stderr.fileno()
    os.set_blocking(out, False)
    os.set_blocking(err, False)
    deadline = time.monotonic() + timeout
    answer = _Capped(MAX_ANSWER, keep_end=False)
    tail = _Capped(_STDERR_TAIL, keep_end=True)
    sinks = {out: answer, err: tail}
    with contextlib.ExitStack() as stack:
        stack.callback(child.stdout.close)
        stack.callback(child.stderr.close)
        exited = os.pidfd_open(child.pid)
        stack.callback(os.close, exited)
        sel = stack.enter_context(selectors.DefaultSelector())
        sel.register(out, selectors.EVENT_READ)
        sel.register(err, selectors.EVENT_READ)
        sel.register(exited, selectors.EVENT_READ)
        done = False
        while not done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(child.args, timeout)
            for key, _ in sel.select(left):
                if key.fd == exited:
                    done = True  # what it wrote before exiting is in the pipes: read below
                elif not sinks[key.fd].read_from(key.fd):
                    sel.unregister(key.fd)  # end of file: wait for the exit
        for fd, sink in sinks.items():  # at most a pipe's worth each: then it is over
            for _ in range(64):
                if not sink.read_from(fd):
                    break
    return (None if answer.over else answer.data()), tail.data()


class _Capped:
    """Bytes read from a pipe, at most ``cap``: the first ``cap`` (``over`` set when
    more came) or, with ``keep_end``, the last ``cap``."""

    def __init__(self, cap: int, *, keep_end: bool) -> None:
        self.cap = cap
        self.keep_end = keep_end
        self.over = False
        self._buf = bytearray()

    def read_from(self, fd: int) -> bool:
        """Reads what is waiting on ``fd``: False at end of file or when nothing is."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not data:
            return False
        if self.keep_end:
            self._buf += data
            del self._buf[: max(0, len(self._buf) - self.cap)]
        elif not self.over:
            self._buf += data
            if len(self._buf) > self.cap:
                self.over = True
                self._buf.clear()
        return True

    def data(self) -> bytes:
        return bytes(self._buf)


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


def _end_tree(root: int) -> None:
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


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    """Kills the child's process group and reaps the child.

    Every process the reader starts is ended by the child itself before it answers
    (it is a subreaper: :data:`_CHILD`), and at the deadline by :func:`_end_tree`
    before this kill. What can still escape: a process started in a session of its own
    by a reader whose interpreter then ended without answering (``os._exit``, a crash:
    its orphans go to init), one forked in the instant between :func:`_end_tree`'s last
    round and this kill, and anything the reader asks another service to start
    (``systemd-run``, ``at``). None of them can write the file read (Landlock)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def same_value(a: Any, b: Any) -> bool:
    """Equal, counting a boolean and a number as different (Python has True == 1)."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def merge_metadata(
    given: Mapping[str, Any],
    from_file: Mapping[str, Any] | None,
    mode: FileMetadataMode,
    *,
    source: str = "the file",
) -> dict[str, Any]:
    """The metadata to register: ``given`` (configuration, sidecar, command line) and
    the file's (None: not read), under ``mode``.

    ``skip``: the given metadata only. ``read``: the file's values plus the given
    ones, which must agree where both have a key. ``override``: the same, the given
    value winning where they differ. Raises :class:`MetadataMismatch` naming every
    key that differs (``read`` only); ``source`` names the file in the message.
    """
    if mode == "skip" or not from_file:
        return dict(given)
    differ = sorted(
        k for k in from_file.keys() & given.keys() if not same_value(from_file[k], given[k])
    )
    if differ and mode == "read":
        details = "; ".join(
            f"{k} is {from_file[k]!r} there but {given[k]!r} was given" for k in differ
        )
        raise MetadataMismatch(
            f"the metadata given for {source} contradicts the file's own: {details}",
            hint="correct the given metadata (sidecar, inbox configuration or -k options), "
            "or register the given values instead (file_metadata: override; nbankctl "
            "deposit --override-file-metadata)",
        )
    return {**from_file, **given}


__all__ = [
    "DEFAULT_MEMORY",
    "DEFAULT_TIMEOUT",
    "ENTRY_POINT_GROUP",
    "FILE_METADATA_VALUES",
    "FileMetadataMode",
    "InvalidFile",
    "MetadataMismatch",
    "MetadataReaderUnavailable",
    "ReaderResult",
    "find_reader",
    "merge_metadata",
    "read_file_metadata",
]
