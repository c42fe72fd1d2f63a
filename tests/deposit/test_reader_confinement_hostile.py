"""Hostile review of how metadata readers are confined (nbankd.metadata_readers).

The readers are a real plugin package built here (a module and a ``.dist-info``
folder declaring them in ``nbank.metadata_readers``), as
tests/deposit/test_reader_confinement.py builds its own. Each stands for a lab's
plugin that does something its author did not think through: it signals the process
that runs it, changes the mode, times or attributes of a file (Landlock denies
writing, never ``chmod()``/``utime()``/``setxattr()``), or starts a helper with
``clone(CLONE_PARENT)``.

Tests named ``test_guard_*`` pass on the code as reviewed and keep what held: no
descriptor route lets a confined reader write the file it reads. Every other test
fails on the code as reviewed; its docstring names the behaviour expected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, make_backend
from fixtures.readers import plugin_package, read_with
from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import FINAL, State, next_step
from nbankd.metadata_readers import read_file_metadata
from nbankd.readerbox import landlock_abi

READERS = r"""
import ctypes, errno, mmap, os, platform, signal, time
from pathlib import Path

def killing(path):
    # "stops the job" it thinks it runs in: its parent
    os.kill(os.getppid(), signal.SIGKILL)
    return {"ok": 1}

def _other(path):
    # the file named inside the one it reads (an archived recording)
    return Path(path).read_text().strip()

def chmodding(path):
    # makes the recording it indexes readable (and writable) by the whole lab
    os.chmod(_other(path), 0o666)
    return {"ok": 1}

def utiming(path):
    os.utime(_other(path), ns=(0, 0))
    return {"ok": 1}

def tagging(path):
    os.setxattr(_other(path), "user.nbank.indexed", b"1")
    return {"ok": 1}

def touching(path):
    # marks the file it read as read, as "touch" would
    Path(path).touch()
    return {"ok": 1}

def cloning(path):
    # a helper started beside the reader (clone(CLONE_PARENT), as some runtimes do
    # for a watchdog), in a session of its own; answers with its process id
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    number = {"x86_64": 56, "aarch64": 220}[platform.machine()]
    r, w = os.pipe()
    pid = libc.syscall(ctypes.c_long(number), ctypes.c_ulong(0x8000 | signal.SIGCHLD),
                       ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if pid == 0:
        os.setsid()
        os.write(w, str(os.getpid()).encode())
        while True:
            time.sleep(3600)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")
    os.close(w)
    return {"helper": int(os.read(r, 32))}

def controlling(path):
    # tells nbankd, through its control socket (named in its configuration, which it
    # may read), to pause every inbox; answers with what nbankd said
    import json, socket
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(_other(path))
        s.sendall(json.dumps({"v": 1, "cmd": "pause", "args": {}}).encode() + b"\n")
        answer = s.makefile("rb").readline()
    return {"control": answer.decode()[:300]}

def writing_every_way(path):
    # every route to a writable descriptor of the file it reads; what succeeded
    got = []
    real = os.path.realpath(path)
    scratch = os.environ["TMPDIR"]
    def attempt(name, fn):
        try:
            fn()
            got.append(name)
        except OSError:
            pass
    def reopen(p):
        os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
    attempt("path", lambda: reopen(path))
    attempt("real path", lambda: reopen(real))
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == real:
                attempt("/proc/self/fd", lambda: reopen(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    parent = os.getppid()
    try:
        theirs = os.listdir(f"/proc/{parent}/fd")
    except OSError:
        theirs = []
    for fd in theirs:
        attempt("/proc/parent/fd", lambda: reopen(f"/proc/{parent}/fd/{fd}"))
    attempt("/proc/parent/mem", lambda: os.close(os.open(f"/proc/{parent}/mem", os.O_RDWR)))
    attempt("hard link in scratch", lambda: os.link(real, os.path.join(scratch, "l")))
    attempt("rename into scratch", lambda: os.rename(real, os.path.join(scratch, "r")))
    fd = os.open(path, os.O_RDONLY)
    attempt("mmap shared", lambda: mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_WRITE))
    attempt("fallocate", lambda: os.posix_fallocate(fd, 0, 1 << 20))
    src = os.open(os.path.join(scratch, "src"), os.O_RDWR | os.O_CREAT)
    os.write(src, b"X" * 4096)
    attempt("copy_file_range", lambda: os.copy_file_range(src, fd, 16, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(0x4206, parent, 0, 0) == 0:  # PTRACE_SEIZE (stops nothing)
        libc.ptrace(17, parent, 0, 0)  # PTRACE_DETACH
        got.append("ptrace")
    return {"written": got}
"""

ENTRY_POINTS = """\
[nbank.metadata_readers]
kill-rec = confinehostile:killing
chmod-rec = confinehostile:chmodding
utime-rec = confinehostile:utiming
xattr-rec = confinehostile:tagging
touch-rec = confinehostile:touching
clone-rec = confinehostile:cloning
every-rec = confinehostile:writing_every_way
ctl-rec = confinehostile:controlling
"""

DATA = b"RIFF" + b"recording " * 200

landlock = pytest.mark.skipif(landlock_abi()[0] < 3, reason="needs Landlock ABI 3")
#: Landlock's scopes (signals, abstract sockets) came with ABI 6 (Linux 6.12)
landlock_scopes = pytest.mark.skipif(landlock_abi()[0] < 6, reason="needs Landlock ABI 6")


def package(root: Path) -> Path:
    """Writes the package confinehostile (its module and dist-info) into ``root``."""
    return plugin_package(root, "confinehostile", READERS, ENTRY_POINTS)


@pytest.fixture
def search(tmp_path: Path) -> list[str]:
    """The child's search path, the package on it."""
    return [*sys.path, str(package(tmp_path / "plugins"))]


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    """A recording."""
    f = tmp_path / "rec.dat"
    f.write_bytes(DATA)
    return f


# --- what held ------------------------------------------------------------------------


@landlock
def test_guard_no_descriptor_route_writes_the_file_read(search: list[str], rec: Path) -> None:
    """(guard, passes) Confined, the reader gets no writable descriptor of the file it
    reads by any route: its path, /proc/self/fd, the parent's /proc/PID/fd and mem,
    a hard link or rename into its scratch folder, a shared mapping, fallocate,
    copy_file_range, ptrace of the daemon."""
    before = os.stat(rec)
    result = read_file_metadata("every-rec", rec, search_path=search)
    assert result.status == "read", result.message
    assert result.metadata["written"] == []
    after = os.stat(rec)
    assert rec.read_bytes() == DATA
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns, after.st_nlink) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
        before.st_nlink,
    )


# --- signals ------------------------------------------------------------------------


RUN_ONE = """
import json, sys
from nbankd.metadata_readers import read_file_metadata
r = read_file_metadata(sys.argv[1], sys.argv[2], search_path=json.loads(sys.argv[3]), timeout=30)
print(json.dumps([r.status, r.message]))
"""


@landlock_scopes
def test_a_reader_cannot_kill_the_daemon_that_runs_it(search: list[str], rec: Path) -> None:
    """A reader that signals its parent (nbankd: kill(getppid(), SIGKILL), or SIGSTOP,
    which freezes every deposit until the watchdog restarts nbankd, which runs the
    reader again) is refused (Landlock's signal scope, ABI 6): the process running it
    lives on and is told the reader failed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run(
        [sys.executable, "-c", RUN_ONE, "kill-rec", str(rec), json.dumps(search)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"the process running the reader died ({r.returncode}) {r.stderr}"
    status, _ = json.loads(r.stdout.splitlines()[-1])
    assert status == "unavailable"


# --- attributes: chmod(), utime(), setxattr() are no writes to Landlock ---------------


@landlock
def test_a_reader_touching_the_only_copy_leaves_its_times(env: Env) -> None:
    """Placed by rename, the claimed input is the recording's only copy: a reader that
    "touches" the file it read (Path.touch: utime) must not move the recording's
    modification time (its acquisition time to the lab); the input goes back, or is
    deposited, with the time it had."""
    read_with(env, package(env.root / "plugins"))
    env.registry.add_datatype("touch-rec")
    env.reconfigure(dtype="touch-rec", placement="rename")
    (env.inbox / "song.wav").write_bytes(DATA)
    recorded = 1_600_000_000_000_000_000  # 2020-09-13
    os.utime(env.inbox / "song.wav", ns=(recorded, recorded))
    item = env.journal_existing("song.wav", placement="rename")
    for _ in range(16):
        if item.state in FINAL:
            break
        step = next_step(item.progress, float("inf"))
        assert step is not None, item
        item = env.step(item, step)
    copies = [
        p
        for folder in (env.inbox, env.archive.resources_dir)
        for p in folder.rglob("*")
        if p.is_file() and p.read_bytes() == DATA
    ]
    assert copies, "the recording is nowhere"
    assert [p.stat().st_mtime_ns for p in copies] == [recorded] * len(copies), (
        item.error_code,
        item.error_message,
    )
    # it waits, told (attempts growing: status degraded), never claimed again unseen
    assert (item.state, item.error_code) == (State.CLAIMED, "metadata-reader-unavailable")
    assert item.attempts > 1 and "times" in (item.error_message or "")


@pytest.fixture
def ctl(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """nbankctl over an embedded registry, the reader package on its PYTHONPATH."""
    b = make_backend("embedded", tmp_path, request)
    where = [str(package(tmp_path / "plugins")), b.env.get("PYTHONPATH", "")]
    b.env = dict(b.env, PYTHONPATH=os.pathsep.join(filter(None, where)))
    yield b
    b.registry.close()


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: Landlock cannot deny utime(), chmod() or setxattr(); a "
    "reader that sets the times of the file it reads changes them (caught: never "
    "deposited as read, and told), see README 'Metadata readers'",
)
@landlock
def test_a_dry_run_leaves_the_files_times_as_they_were(ctl: Backend) -> None:
    """nbankctl deposit -y "changes nothing": run by the file's owner, its reader that
    touches the file it read must not move the recording's modification time."""
    archive, _ = ctl.archive()
    ctl.registry.add_datatype("touch-rec", "application/octet-stream")
    src = ctl.tmp / "rig" / "song.wav"
    src.parent.mkdir()
    src.write_bytes(DATA)
    recorded = 1_600_000_000_000_000_000
    os.utime(src, ns=(recorded, recorded))
    r = ctl.ctl("deposit", str(archive.path), "-d", "touch-rec", "-y", str(src))
    assert src.stat().st_mtime_ns == recorded, (r.returncode, r.stdout, r.stderr)


# --- processes ------------------------------------------------------------------------
