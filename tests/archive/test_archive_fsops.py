"""The small durable primitives every state file goes through."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbankd.archive.fsops import TORN_TAIL_MAX, NotALog, append_durable, write_atomic


def test_append_cuts_off_a_torn_line_first(tmp_path: Path) -> None:
    """A last line left without its newline (a crash mid-write) is cut off, so the new
    line stays whole and readable on its own."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": ')
    append_durable(log, b'{"c": 3}\n')
    assert log.read_bytes() == b'{"a": 1}\n{"c": 3}\n'


def test_a_line_torn_just_before_its_newline_is_never_made_whole(tmp_path: Path) -> None:
    """A line cut one byte short (all of it but its newline) is cut off, not ended: its
    append, run again, leaves it in the log once."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": 2}')
    append_durable(log, b'{"b": 2}\n')
    assert log.read_bytes() == b'{"a": 1}\n{"b": 2}\n'


def test_a_first_line_torn_is_cut_off(tmp_path: Path) -> None:
    """A log holding only a torn first line is emptied before the new line."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": ')
    append_durable(log, b'{"c": 3}\n')
    assert log.read_bytes() == b'{"c": 3}\n'


def test_a_run_too_long_to_be_a_torn_line_is_kept_and_ended(tmp_path: Path) -> None:
    """More than TORN_TAIL_MAX bytes without a newline are not a line of ours: kept,
    ended, and the new line written after them."""
    log = tmp_path / "log.jsonl"
    blob = b"x" * (TORN_TAIL_MAX + 2)
    log.write_bytes(b"one\n" + blob)
    append_durable(log, b"two\n")
    assert log.read_bytes() == b"one\n" + blob + b"\ntwo\n"


def test_a_write_that_fails_takes_back_what_it_wrote(tmp_path: Path) -> None:
    """An append stopped part way (a file size limit, as a full disk would) leaves the
    log as it was: no part of the line is left to be read or ended later."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"one\n")
    code = (
        "import resource, signal, sys\n"
        "from nbankd.archive.fsops import append_durable\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))\n"
        "try:\n"
        f"    append_durable({str(log)!r}, b'two, too long\\n')\n"
        "except OSError as err:\n"
        "    sys.exit(err.errno)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=60)
    assert done.returncode == errno.EFBIG
    assert log.read_bytes() == b"one\n"


def test_appenders_take_turns(tmp_path: Path) -> None:
    """An append waits while another holds the log's lock (another thread or process
    appending), so a line being written is never taken for a torn one."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"one\n")
    holder = os.open(log, os.O_RDWR | os.O_APPEND)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"two, half")  # the holder's line, not yet whole
    appended = threading.Thread(target=append_durable, args=(log, b"three\n"))
    appended.start()
    ino = f":{log.stat().st_ino} "
    deadline = time.monotonic() + 30
    while not any(
        "-> FLOCK" in row and ino in row for row in Path("/proc/locks").read_text().splitlines()
    ):  # the appender blocked on the log's lock, as /proc/locks lists it
        assert appended.is_alive() and time.monotonic() < deadline, "the append did not wait"
        time.sleep(0.01)  # polling interval of a bounded wait
    os.write(holder, b" written\n")
    os.close(holder)  # lock released
    appended.join(30)
    assert log.read_bytes() == b"one\ntwo, half written\nthree\n"


def test_a_sync_left_for_later_does_not_hold_the_log(tmp_path: Path) -> None:
    """An append whose fsync is left for later (a duplicate of its descriptor kept, as a
    round's shared fsyncs keep it) does not keep the next append waiting."""
    log = tmp_path / "log.jsonl"
    kept: list[int] = []
    append_durable(log, b"one\n", sync=lambda fd: kept.append(os.dup(fd)))
    second = threading.Thread(target=append_durable, args=(log, b"two\n"), daemon=True)
    second.start()
    second.join(30)  # returns at once unless the lock is still held
    for fd in kept:
        os.close(fd)
    assert not second.is_alive(), "the second append waited for the first one's fsync"
    assert log.read_bytes() == b"one\ntwo\n"


def test_append_creates_the_log_with_its_mode(tmp_path: Path) -> None:
    """A new log gets the mode asked for and holds exactly the line."""
    log = tmp_path / "new.jsonl"
    append_durable(log, b"one\n", mode=0o640)
    append_durable(log, b"two\n", mode=0o600)
    assert log.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


def test_append_refuses_a_link(tmp_path: Path) -> None:
    """A link in the log's place is never followed: the target is untouched."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep\n")
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(OSError) as caught:
        append_durable(tmp_path / "log.jsonl", b"x\n")
    assert caught.value.errno == errno.ELOOP and target.read_bytes() == b"keep\n"


def _fifo_reader(path: Path) -> int:
    """A FIFO at ``path`` and a reader of it, holding whatever is written into it."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def _unread(reader: int) -> bytes:
    """What was written into the FIFO of ``reader`` and not read yet."""
    try:
        return os.read(reader, 1 << 16)
    except BlockingIOError:  # a writer still holds it open: nothing in it
        return b""


def test_append_writes_nothing_into_a_fifo_at_the_log_path(tmp_path: Path) -> None:
    """A FIFO in the log's place is refused, naming it, and takes no line: a line
    written into it would be gone when its last reader closes."""
    log = tmp_path / "log.jsonl"
    reader = _fifo_reader(log)
    try:
        with pytest.raises(NotALog) as caught:
            append_durable(log, b'{"a": 1}\n')
        assert _unread(reader) == b""
    finally:
        os.close(reader)
    assert caught.value.filename == str(log) and "a FIFO" in caught.value.strerror


@pytest.mark.parametrize("kind", ["socket", "device file"])
def test_append_refuses_a_socket_or_device_at_the_log_path(tmp_path: Path, kind: str) -> None:
    """A socket or a device (here one like /dev/null) in the log's place is refused,
    naming what it is, instead of being opened and written to."""
    log = tmp_path / "log.jsonl"
    if kind == "socket":
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(str(log))
    else:
        try:
            os.mknod(log, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device needs CAP_MKNOD")
    with pytest.raises(NotALog) as caught:
        append_durable(log, b'{"a": 1}\n')
    assert caught.value.filename == str(log) and f"a {kind}" in caught.value.strerror
    if kind == "socket":
        holder.close()


def test_append_wants_whole_lines(tmp_path: Path) -> None:
    """A line without its newline is a caller's bug, refused before anything is written."""
    with pytest.raises(ValueError):
        append_durable(tmp_path / "log", b"no newline")
    assert not (tmp_path / "log").exists()


def test_write_atomic_without_replace_never_overwrites(tmp_path: Path) -> None:
    """replace=False publishes by link: an existing file stays, no temporary is left."""
    path = tmp_path / "nbank.json"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", replace=False)
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["nbank.json"]
