"""Whether a file is still open for writing, asked of the kernel with a read lease,
against real processes holding real descriptors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.holders import held_open
from fixtures.users import TestUser
from nbankd.watch.writers import calibrate, open_for_writing, open_for_writing_at

REPO = Path(__file__).resolve().parents[2]


def _ask(path: Path) -> bool | None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return open_for_writing_at(fd, os.fsencode(path.name))
    finally:
        os.close(fd)


def test_a_closed_file_has_no_writer(tmp_path: Path) -> None:
    """A file nobody holds open is not open for writing."""
    path = tmp_path / "done.dat"
    path.write_bytes(b"finished")
    assert _ask(path) is False


def test_another_process_appending_is_a_writer(tmp_path: Path) -> None:
    """A file another process holds open for appending is open for writing, and no
    longer once that process has closed it."""
    path = tmp_path / "rec.dat"
    path.write_bytes(b"recording")
    with held_open(path, "ab"):
        assert _ask(path) is True
    assert _ask(path) is False


def test_a_reader_is_not_a_writer(tmp_path: Path) -> None:
    """A process that only reads the file does not count."""
    path = tmp_path / "read.dat"
    path.write_bytes(b"data")
    with held_open(path, "rb"):
        assert _ask(path) is False


def test_read_write_open_counts_as_writer(tmp_path: Path) -> None:
    """Open for reading and writing (r+b) counts as open for writing."""
    path = tmp_path / "rw.dat"
    path.write_bytes(b"data")
    with held_open(path, "r+b"):
        assert _ask(path) is True


def test_a_fifo_cannot_tell_and_does_not_block(tmp_path: Path) -> None:
    """A FIFO swapped in for the file is opened without blocking and answered None."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    assert _ask(path) is None


def test_a_link_is_not_followed(tmp_path: Path) -> None:
    """A symbolic link is never opened through: None, not its target's answer."""
    target = tmp_path / "target.dat"
    target.write_bytes(b"x")
    (tmp_path / "link").symlink_to(target)
    with held_open(target, "ab"):
        assert _ask(tmp_path / "link") is None


def test_the_lease_is_dropped_at_once(tmp_path: Path) -> None:
    """After the question the lease is gone: another process opens the file for writing
    without blocking (with a lease kept, O_NONBLOCK would answer EWOULDBLOCK)."""
    path = tmp_path / "free.dat"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert open_for_writing(fd) is False
        code = (
            "import os, sys\n"
            "try:\n"
            "    os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))\n"
            "    print('opened')\n"
            "except BlockingIOError:\n"
            "    print('blocked')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == "opened", out.stderr
    finally:
        os.close(fd)


_ASK = (
    "import os, sys\n"
    "from nbankd.watch.writers import open_for_writing\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "print(open_for_writing(fd))\n"
)


def _ask_as(user: TestUser, path: Path, *, cap_lease: bool) -> str:
    """What ``user`` (with or without CAP_LEASE, as the unit grants it) is told."""
    caps = ["--inh-caps=+lease", "--ambient-caps=+lease"] if cap_lease else ["--inh-caps=-all"]
    argv = [
        "setpriv",
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--init-groups",
        *caps,
        "--",
        sys.executable,
        "-c",
        _ASK,
        str(path),
    ]
    env = user.env({"PYTHONPATH": str(REPO)})
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def not_theirs() -> Iterator[Path]:
    """A root-owned file (mode 0644) in a folder every user can search."""
    folder = Path(tempfile.mkdtemp(prefix="nbankd-writers-", dir="/tmp"))
    folder.chmod(0o755)
    path = folder / "rig.dat"
    path.write_bytes(b"x")
    path.chmod(0o644)
    yield path
    shutil.rmtree(folder)


def test_without_ownership_or_cap_lease_the_answer_is_unknown(
    other_user: TestUser, not_theirs: Path
) -> None:
    """A process that neither owns the file nor holds CAP_LEASE cannot tell: None."""
    assert _ask_as(other_user, not_theirs, cap_lease=False) == "None"


def test_cap_lease_tells_about_other_users_files(other_user: TestUser, not_theirs: Path) -> None:
    """With CAP_LEASE (the systemd unit's one capability) a service user can tell
    about files rig users own: open for writing or not."""
    assert _ask_as(other_user, not_theirs, cap_lease=True) == "False"
    with held_open(not_theirs, "ab"):
        assert _ask_as(other_user, not_theirs, cap_lease=True) == "True"


def test_a_filesystem_saying_open_for_a_closed_file_is_not_trusted(tmp_path: Path) -> None:
    """When the control file, which nothing should hold open, is reported open for
    writing (as NFSv4 without a delegation reports every file), answers about files of
    its device are "cannot tell", never "open"; a later "closed" trusts them again."""
    control, rec = tmp_path / "token", tmp_path / "rec.dat"
    control.write_bytes(b"t")
    rec.write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with held_open(control, "ab"), held_open(rec, "ab"):  # every file reads "open"
            calibrate(fd, b"token")
            assert open_for_writing_at(fd, b"rec.dat") is None
        calibrate(fd, b"token")
        with held_open(rec, "ab"):
            assert open_for_writing_at(fd, b"rec.dat") is True
    finally:
        calibrate(fd, b"token")  # this device trusted again whatever happened above
        os.close(fd)
