"""Hostile review of today's tape member rule (nbankd.tape.member_problem, used by tape
register, check tar, prune and import) and of nbankctl's bounded standard error
(nbankctl.stderr, since made to wait for its reader: a report is never cut short, a
failing stderr never changes the exit status): real nbankctl subprocesses, real tars,
real pipes.

Findings, fixed: a report cut short by a paused reader (``2>&1 | less``) said nothing
of it (stderr dropped output after 2 s; it now waits for its reader); prune trusted a
tape key naming another resource's member (a key set by another tool; tape import takes
the identifier from the member's name) and deleted the local copy."""

from __future__ import annotations

import array
import fcntl
import io
import os
import signal
import subprocess
import tarfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, make_tar, store
from fixtures.processes import stuck_pipe

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named on Python 3.10+ Linux only


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _read_all(fd: int) -> bytes:
    """Everything a pipe gives until its writers are gone."""
    got = b""
    while chunk := os.read(fd, 65536):
        got += chunk
    return got


def _pending(fd: int) -> int:
    """How many bytes a pipe holds unread."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def _writing_blocked(pid: int) -> bool:
    """Whether process ``pid`` waits in a write to a full pipe (its kernel wait channel)."""
    try:
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


def _tar_head() -> bytes:
    """The first 1024 bytes of a tar whose one member holds 100000 bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("abc.dat")
        info.size = 100000
        tar.addfile(info, io.BytesIO(b"x" * info.size))
    return buf.getvalue()[:1024]


def _register_many(b: Backend, count: int) -> tuple[Path, list[str]]:
    """A tar of ``count`` registered resources (files); its path and their ids."""
    _, arch = b.archive()
    members, ids = [], []
    for n in range(count):
        data = b.blob(f"m{n}")
        id = b.resource(data, arch)
        ids.append(id)
        members.append((f"resources/{id[:2]}/{id}.dat", data))
    return make_tar(b.tmp / "many.tar", members), ids


# --- tape: the member rule ---------------------------------------------------------------


def test_prune_keeps_a_copy_whose_tape_key_names_another_resources_member(
    embedded: Backend,
) -> None:
    """A tape key naming a member whose name stands for another id cannot restore this
    resource (tape import takes a member's id from its name): prune keeps the file."""
    archive, arch = embedded.archive()
    data = embedded.blob("wrongkey")
    id = embedded.resource(data, arch)
    path = store(archive, id, data)
    tape = embedded.name("TAPE")
    embedded.registry.add_archive(f"{tape}-1", "tape", f"{tape}:1", "offline")
    embedded.registry.add_location(id, f"{tape}-1", key="resources/zz/someoneelse.dat")
    proc = embedded.ctl("tape", "prune", arch, "-", input=id + "\n")
    assert path.exists() and path.read_bytes() == data, proc.stderr
    assert proc.returncode == 1, proc.stderr


def test_register_locates_the_good_members_of_a_tar_that_also_holds_refused_ones(
    embedded: Backend,
) -> None:
    """A hard link and a '..' member are refused (exit 1); the plain member beside
    them is located all the same, and prune then trusts it."""
    archive, arch = embedded.archive()
    good, bad = embedded.blob("good"), embedded.blob("bad")
    idg, idb = embedded.resource(good, arch), embedded.resource(bad, arch)
    pathg = store(archive, idg, good)
    tar_path = embedded.tmp / "mixed.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo(f"x/../{idb}.dat")
        info.size = len(bad)
        tar.addfile(info, io.BytesIO(bad))
        info = tarfile.TarInfo(f"{idg}.dat")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
        link = tarfile.TarInfo(f"l/{idb}.dat")
        link.type, link.linkname = tarfile.LNKTYPE, f"{idg}.dat"
        tar.addfile(link)
    tape = embedded.name("TAPE")
    proc = embedded.ctl("tape", "register", tape, "0", str(tar_path))
    assert proc.returncode == 1, proc.stderr
    locs = embedded.registry.get_locations_bulk([idg, idb])
    assert [loc.key for loc in locs.get(idg, []) if loc.archive_name == f"{tape}-0"] == [
        f"{idg}.dat"
    ]
    assert not [loc for loc in locs.get(idb, []) if loc.archive_name == f"{tape}-0"]
    assert embedded.ctl("tape", "prune", arch, "-", input=idg + "\n").returncode == 0
    assert not pathg.exists()


# --- the bounded standard error ------------------------------------------------------------


def test_a_report_read_slowly_is_given_whole(embedded: Backend) -> None:
    """tape register -y's report (stdout and stderr on one small pipe) read by a reader
    that pauses once the pipe is full (a pager left on its first page): every line, the
    summary last, the same as read at once; nbankctl waits for its reader."""
    tar, _ = _register_many(embedded, 150)
    argv = ["tape", "register", "-y", embedded.name("TAPE"), "0", str(tar)]
    assert embedded.ctl(*argv).returncode == 0  # registered: the runs below say the same
    reference = embedded.ctl(*argv)
    assert reference.returncode == 0, reference.stderr
    assert len(reference.stderr) > 8192
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        proc = subprocess.Popen(
            [NBANKCTL, *embedded.before, *argv],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=w,
            env=embedded.env,
        )
        os.close(w)
        w = -1
        try:
            deadline = time.monotonic() + 60
            while not _writing_blocked(proc.pid):  # the pipe full: it waits for its reader
                assert proc.poll() is None and time.monotonic() < deadline
                os.sched_yield()
            time.sleep(3)  # the reader's pause (longer than any deadline of a write)
            text = _read_all(r).decode()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert text == reference.stdout + reference.stderr or (
        sorted(text.splitlines()) == sorted((reference.stdout + reference.stderr).splitlines())
    ), text[-300:]
    assert text.rstrip("\n").splitlines()[-1] == reference.stderr.rstrip("\n").splitlines()[-1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_stderr_is_stuck_gives_the_signals_status(
    embedded: Backend, signum: int
) -> None:
    """tape import with its tar on stdin and a stderr nobody reads (it waits there, or
    reads on): SIGTERM/SIGINT end it promptly with 128 + the signal."""
    archive, _ = embedded.archive()
    r, w = stuck_pipe()
    proc = subprocess.Popen(
        [NBANKCTL, *embedded.before, "tape", "import", "-", str(archive.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=w,
        env=embedded.env,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(_tar_head())  # a member's header, not its bytes: it reads on
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        # inside the command: its tar read, or its report waiting for stderr's reader
        while _pending(proc.stdin.fileno()) and not _writing_blocked(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            os.sched_yield()
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(w)
        os.close(r)


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["tape", "register", "T", "0", "/nonexistent/x.tar"], 2), (["--version"], 0)],
)
def test_a_full_stderr_keeps_the_exit_status(
    embedded: Backend, argv: list[str], status: int
) -> None:
    """stderr on a full device (/dev/full: ENOSPC): the command's own status, no hang."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [NBANKCTL, *embedded.before, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=full,
            env=embedded.env,
            timeout=60,
        )
    assert proc.returncode == status


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["tape", "register", "T", "0", "/nonexistent/x.tar"], 2), (["--version"], 0)],
)
def test_a_closed_stderr_keeps_the_exit_status(
    embedded: Backend, argv: list[str], status: int
) -> None:
    """nbankctl run with 2>&- exits with the command's own status."""
    cmd = " ".join(f"'{a}'" for a in [NBANKCTL, *embedded.before, *argv])
    proc = subprocess.run(
        ["sh", "-c", f"exec {cmd} 2>&-"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=embedded.env,
        timeout=60,
    )
    assert proc.returncode == status


def test_a_closed_stdout_ends_quietly_with_status_0(embedded: Backend) -> None:
    """check tar --json with its reader gone: exit 0, no traceback on stderr."""
    tar, _ = _register_many(embedded, 3)
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [NBANKCTL, *embedded.before, "check", "tar", "--json", str(tar)],
            stdin=subprocess.DEVNULL,
            stdout=w,
            capture_output=False,
            stderr=subprocess.PIPE,
            env=embedded.env,
            timeout=60,
            text=True,
        )
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_the_last_lines_reach_a_shared_pipe_whole_and_in_order(embedded: Backend) -> None:
    """2>&1 into one pipe read as it comes: check tar's report ends with its summary,
    every member line present once."""
    tar, ids = _register_many(embedded, 40)
    proc = subprocess.run(
        [NBANKCTL, *embedded.before, "check", "tar", str(tar)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=embedded.env,
        timeout=60,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
    for id in ids:
        assert proc.stdout.count(f"{id}.dat") == 1, proc.stdout
    assert proc.stdout.rstrip("\n").splitlines()[-1].startswith("Resources checked: 40")
