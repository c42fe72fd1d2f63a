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
Landlock domain (:mod:`nbankd.readerbox`) before it loads the plugin, so the file it
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
import json
import os
import selectors
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

from nbankd import errors, readerbox
from nbankd.readerbox import LANDLOCK_HINT, reader_confinement

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
        before = readerbox.snapshot(fd)
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
            "landlock": readerbox.landlock_rules(scratch),
            "nesting": MAX_NESTING,
        }
        child = subprocess.Popen(
            [python, "-I", "-c", readerbox.CHILD, json.dumps(request)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # only its end is kept: a chatty reader fills nothing
            start_new_session=True,  # its own process group: killed whole at the deadline
            close_fds=True,
            cwd=scratch,
            env=readerbox.reader_environment(scratch),
            pass_fds=(fd,),  # the same number in the child: the link above points at it
        )
        late = False
        try:
            out, err_tail = _answer(child, timeout)
        except subprocess.TimeoutExpired:
            readerbox.end_tree(child.pid)
            out, err_tail, late = b"", b"", True
        finally:
            readerbox.kill_group(child)  # what the reader may have started in the background
        after = readerbox.snapshot(fd)
        if after != before:  # whatever it answered
            return ReaderResult(
                "changed",
                message=f"{label} changed the file it was given to read "
                f"({readerbox.change(before, after, confined=request['landlock'] is not None)}): "
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
    "LANDLOCK_HINT",
    "FileMetadataMode",
    "InvalidFile",
    "MetadataMismatch",
    "MetadataReaderUnavailable",
    "ReaderResult",
    "find_reader",
    "merge_metadata",
    "read_file_metadata",
    "reader_confinement",
]
