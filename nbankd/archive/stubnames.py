"""What a stub folder holds, kept exact by inotify, so a publish need not list it.

Publishing checks, under the identifier's lock, that no other name already files the
identifier (``abc`` against ``abc.wav``): a pass over the stub folder's names. A lab
whose names share a prefix files them all in one stub folder, and with 100,000 names
there that pass costs about 34 ms per file on this machine's ext4.

:class:`StubNames` keeps the names of recently used stub folders instead, and learns
every change from the kernel: an inotify watch is added on the folder before it is
listed, and the watch's events are read before every answer. The kernel queues an
event within the call that changed the folder, so an answer after that read reflects
every link, unlink and mkdir that had returned by then, whoever made it (another
daemon, ``nbank deposit``, a program through an NFS export of this disk): what a
listing made at that moment would say.

It answers only where that holds, and says "not known" (the caller lists, as before)
everywhere else:

- only on filesystems whose every change goes through this kernel (:data:`LOCAL_FS`
  by ``fstatfs`` magic number): a change made by another NFS, SSHFS or cluster client
  raises no inotify event here;
- a rename into or out of a watched folder (rare: nbankd links files) drops that
  folder's names, to be listed again on the next question;
- a lost event (the queue overflowed), a folder removed or moved, an unmounted
  filesystem, or any error reading events drops every folder's names;
- a folder is matched by device and inode, and before each answer the kernel confirms
  that the path still names the very folder watched (re-adding the watch by path gives
  back its watch descriptor): a stub folder replaced by another at the same path is
  listed anew, even one with the same numbers (btrfs gives a subvolume made in place of
  a deleted one the deleted one's device number, and its folders the same inodes);
- at most :data:`MAX_FOLDERS` folders and :data:`MAX_NAMES` names are kept (the least
  recently asked about go first), and a folder bigger than that, or grown past it, is
  not kept, nor listed again by each question (only every :data:`BIG_RETRY`-th): memory
  stays bounded, and each watch leaves room under ``fs.inotify.max_user_watches`` for
  the inboxes' watches;
- a folder not kept yet is opened and its filesystem asked outside the lock, and a
  device found not local is remembered: a hung network mount holds up no question
  about another folder;
- an error while names or events are being read (MemoryError) drops what they were
  for, never leaving half of them to answer from; a forked child starts afresh (it
  shares the parent's inotify queue: reading it would take the parent's events);
- no inotify instance to be had (the user's ``fs.inotify.max_user_instances`` or the
  descriptor limit reached) means listing as before, and another try after
  :data:`INIT_RETRY` calls: a moment of exhaustion does not slow the daemon for life.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from nbankd.archive.layout import Listing

#: ``fstatfs`` magic numbers of filesystems only this kernel changes: ext2/3/4, xfs,
#: btrfs, tmpfs, f2fs (not zfs: a rollback or ``zfs receive -F`` changes a mounted
#: dataset without an event)
LOCAL_FS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010})
MAX_FOLDERS = 64
MAX_NAMES = 250_000
#: questions about a folder found too big to keep before it is listed again to see
BIG_RETRY = 256
#: calls after a failed ``inotify_init1`` (no instance or descriptor left: EMFILE,
#: ENFILE) before it is tried again; meanwhile every folder is listed, as without it
INIT_RETRY = 1024
#: devices found not local, and folders found too big, remembered (each, at most)
_REMEMBERED = 256

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_MASK_ADD = 0x20000000
_WATCHED = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
#: every add_watch ORs the mask in: adding a watch again without IN_MASK_ADD sets the
#: mark's mask to 0 before setting it again, and an event another CPU delivers in
#: that moment is lost (seen: a name created elsewhere missing from the next answer)
_ADD = _WATCHED | IN_MASK_ADD | IN_ONLYDIR
#: events after which a folder's names are listed again
_RELIST = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_MOVED_FROM | IN_MOVED_TO
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; the name follows


@dataclass(eq=False)
class _Folder:
    key: tuple[int, int]  # st_dev, st_ino
    wd: int
    names: Listing


class _Libc:
    """The four calls of libc this needs; None when libc lacks one."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fstatfs = libc.fstatfs
        self.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]


def fs_magic(fd: int) -> int | None:
    """The ``f_type`` of the filesystem ``fd`` is on (None when it cannot be read)."""
    libc = _libc()
    if libc is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


_LIBC: _Libc | None = None
_LIBC_TRIED = False


def _libc() -> _Libc | None:
    global _LIBC, _LIBC_TRIED
    if not _LIBC_TRIED:
        try:
            _LIBC = _Libc()
        except (OSError, AttributeError):
            _LIBC = None
        _LIBC_TRIED = True
    return _LIBC


class StubNames:
    """The names of recently used stub folders, kept exact by inotify (module doc)."""

    def __init__(
        self,
        *,
        max_folders: int = MAX_FOLDERS,
        max_names: int = MAX_NAMES,
        local_fs: frozenset[int] = LOCAL_FS,
    ) -> None:
        self._local_fs = local_fs  # filesystems whose folders may be kept, by magic
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._broken = False  # no inotify here, or closed: always "not known"
        self._init_skip = 0  # calls left before inotify_init1 is tried again
        self._folders: OrderedDict[tuple[int, int], _Folder] = OrderedDict()
        self._by_wd: dict[int, _Folder] = {}
        self._kept = 0  # names kept, all folders
        self._max_folders = max_folders
        self._max_names = max_names
        self._remote: OrderedDict[int, None] = OrderedDict()  # st_dev found not local
        self._big: OrderedDict[tuple[int, int], int] = OrderedDict()  # questions to skip
        _INSTANCES.add(self)

    def names_of(self, stub: Path, id: str) -> list[str] | None:
        """The names in folder ``stub`` that file ``id`` (``id`` and ``id.*``), as a
        listing made now would give them; None when this cannot say (list instead).
        Raises FileNotFoundError or NotADirectoryError when ``stub`` is no folder."""
        try:
            st = os.lstat(stub)
        except (FileNotFoundError, NotADirectoryError):
            raise
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None  # a link where a stub folder belongs: the caller's listing judges
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if st.st_dev in self._remote:
                return None
            if not self._drain():  # after the lstat: a folder removed before it is gone
                return None
            if self._still_big(key):
                return None
            folder = self._folders.get(key)
            if folder is not None:
                return self._answer(stub, folder, id)
        # not kept: opened and its filesystem asked outside the lock (a hung network
        # mount must not hold up questions about other folders)
        try:
            dir_fd = os.open(stub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                st = os.fstat(dir_fd)
            except OSError:
                return None
            if (st.st_dev, st.st_ino) != key:
                return None  # replaced meanwhile: the caller's listing judges
            if fs_magic(dir_fd) not in self._local_fs:
                with self._lock:
                    _remember(self._remote, st.st_dev, None)
                return None
            with self._lock:
                if not self._drain():
                    return None
                folder = self._folders.get(key)
                if folder is not None:  # kept by another thread meanwhile
                    return self._answer(stub, folder, id)
                folder = self._watch(dir_fd, key)
                return None if folder is None else folder.names.of(id)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Drops every watch and name (tests; the daemon keeps one for its life)."""
        with self._lock:
            self._forget_all()
            self._broken = True

    # -- under the lock ----------------------------------------------------------

    def _inotify(self) -> int | None:
        if self._fd is None and not self._broken:
            if self._init_skip > 0:
                self._init_skip -= 1
                return None
            libc = _libc()
            if libc is None:
                self._broken = True  # no inotify on this system: list as before
                return None
            fd = libc.init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:  # no instance or descriptor left for now: listed, tried again later
                self._init_skip = INIT_RETRY
                return None
            self._fd = fd
        return self._fd

    def _answer(self, stub: Path, folder: _Folder, id: str) -> list[str] | None:
        """``folder``'s names that file ``id``, once the kernel confirms that ``stub``
        still names the very folder watched: adding a watch by path finds an existing
        one by the inode itself, not by its numbers, and gives back its descriptor."""
        libc = _libc()
        if self._fd is None or libc is None:
            return None
        wd = libc.add_watch(self._fd, os.fsencode(stub), _ADD | IN_DONT_FOLLOW)
        if wd == folder.wd:
            self._folders.move_to_end(folder.key)
            return folder.names.of(id)
        # another folder there with the same device and inode numbers, or none by now:
        # these names are not its
        self._forget(folder)
        if wd >= 0:
            if wd in self._by_wd:  # a kept folder under another key: start again
                self._forget_all()
            else:
                libc.rm_watch(self._fd, wd)
        return None

    def _watch(self, dir_fd: int, key: tuple[int, int]) -> _Folder | None:
        """Watches and lists the folder open at ``dir_fd`` (``key``, local)."""
        fd = self._inotify()
        libc = _libc()
        if fd is None or libc is None:
            return None
        # the very folder open at dir_fd, not whatever the path names by now
        wd = libc.add_watch(fd, f"/proc/self/fd/{dir_fd}".encode(), _ADD)
        if wd < 0:
            return None  # watch limit, no /proc: this folder is listed each time
        if wd in self._by_wd:  # the same folder under another key: start again
            self._forget_all()
            return None
        try:
            # listed after the watch: a change since the watch is in the queue, and
            # replaying the queue over the listing gives the folder as it is
            try:
                names: list[str] | None = os.listdir(dir_fd)
            except OSError:
                names = None
            if names is None or len(names) > self._max_names:
                libc.rm_watch(fd, wd)
                if names is not None:
                    _remember(self._big, key, BIG_RETRY)
                return None
            folder = _Folder(key, wd, Listing(names))
        except BaseException:  # MemoryError, KeyboardInterrupt: nothing half-listed kept
            libc.rm_watch(fd, wd)
            raise
        self._folders[key] = folder
        self._by_wd[wd] = folder
        self._kept += len(folder.names)
        if not self._drain():
            return None
        self._trim(keep=folder)
        return self._folders.get(key)

    def _still_big(self, key: tuple[int, int]) -> bool:
        """Whether ``key`` was found too big to keep, and is not to be tried yet."""
        left = self._big.get(key)
        if left is None:
            return False
        if left <= 1:
            del self._big[key]
            return False
        self._big[key] = left - 1
        return True

    def _drain(self) -> bool:
        """Applies every queued event; False if nothing can be said (all dropped)."""
        fd = self._inotify()
        if fd is None:
            return False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                self._forget_all()
                return False
            try:
                if not self._apply(data):
                    return False
            except BaseException:  # events read and not applied: nothing kept is exact
                self._forget_all()
                raise
        if self._kept > self._max_names:  # grown by events
            self._trim()
        return True

    def _apply(self, data: bytes) -> bool:
        """Applies the events in ``data``; False if every name was dropped."""
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + size]
            offset += _EVENT.size + size
            if mask & (IN_Q_OVERFLOW | IN_UNMOUNT):
                self._forget_all()  # closes fd: read nothing more from it
                return False
            folder = self._by_wd.get(wd)
            if folder is None:
                continue  # a watch already dropped
            if mask & _RELIST:
                self._forget(folder)
                continue
            name = os.fsdecode(raw.rstrip(b"\0"))
            before = len(folder.names)
            if mask & IN_CREATE:
                folder.names.add(name)
            elif mask & IN_DELETE:
                folder.names.discard(name)
            self._kept += len(folder.names) - before
        return True

    def _trim(self, *, keep: _Folder | None = None) -> None:
        """Drops folders grown past the names limit, then the least recently asked
        about (never ``keep``) until both limits hold."""
        if self._kept > self._max_names:
            for folder in [f for f in self._folders.values() if len(f.names) > self._max_names]:
                self._forget(folder)
                _remember(self._big, folder.key, BIG_RETRY)
        for folder in list(self._folders.values()):
            if len(self._folders) <= self._max_folders and self._kept <= self._max_names:
                return
            if folder is not keep:
                self._forget(folder)

    def _forget(self, folder: _Folder) -> None:
        if self._folders.get(folder.key) is folder:
            del self._folders[folder.key]
        self._by_wd.pop(folder.wd, None)
        self._kept -= len(folder.names)
        libc = _libc()
        if self._fd is not None and libc is not None:
            libc.rm_watch(self._fd, folder.wd)  # EINVAL if the kernel dropped it: fine

    def _forget_all(self) -> None:
        """Closes the inotify instance (every watch with it); the next question starts
        afresh."""
        self._folders.clear()
        self._by_wd.clear()
        self._kept = 0
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as err:
                if err.errno != errno.EBADF:
                    raise
            self._fd = None

    def _after_fork_in_child(self) -> None:
        """A forked child shares the parent's inotify instance: reading its queue would
        take events the parent needs, removing a watch would remove the parent's. The
        child drops its copy, unread, and starts afresh."""
        self._lock = threading.Lock()
        fd, self._fd = self._fd, None
        self._folders.clear()
        self._by_wd.clear()
        self._kept = 0
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _remember(kept: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
    """Puts ``key`` last in ``kept``, the first ones dropped past :data:`_REMEMBERED`."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > _REMEMBERED:
        kept.popitem(last=False)


_INSTANCES: weakref.WeakSet[StubNames] = weakref.WeakSet()


def watched_folders() -> frozenset[tuple[int, int]]:
    """``(st_dev, st_ino)`` of every folder whose names are kept, all instances: the
    inboxes' watch proof leaves these watches out (an archive folder may have an inbox
    folder's inode number on another filesystem)."""
    found: set[tuple[int, int]] = set()
    for names in list(_INSTANCES):
        with names._lock:
            found.update(names._folders)
    return frozenset(found)


def _after_fork_in_child() -> None:
    for names in list(_INSTANCES):
        names._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: the daemon's one instance: every publish of this process asks it
STUB_NAMES = StubNames()
