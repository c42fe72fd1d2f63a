"""nbankctl deposit's /proc fallback (``manual.writers_gone`` with
``nbankd.watch.fdinfo``) where every lease is refused (NFSv4 without delegations, CIFS
without oplocks; the kernel's EAGAIN simulated on ``writers._ask``, as the tests of
test_manual_calibrate do). Each test names a writer of this host, visible in /proc to
the depositing process, that the README says is still refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fixtures.holders import held_open, holding
from fixtures.manual_env import ManualFiles, manual_folder
from fixtures.steps_env import Env, env
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import FINAL, State
from nbankd.watch import writers

__all__ = ["env"]

_HOLD = "import sys; f = open(*sys.argv[1:3]); print('open', flush=True); sys.stdin.read()"

# opens the file read-write, maps it shared and writable, closes the descriptor and
# keeps the mapping (a writer through memory, as many recorders write)
_MAP = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR)
addr = libc.mmap(None, os.fstat(fd).st_size, mmap.PROT_READ | mmap.PROT_WRITE,
                 mmap.MAP_SHARED, fd, 0)
assert addr not in (None, ctypes.c_void_p(-1).value)
os.close(fd)
print('open', flush=True)
sys.stdin.read()
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


@pytest.fixture
def files(env: Env) -> Iterator[ManualFiles]:
    with manual_folder(env, zip_directories=True) as made:
        yield made


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m (root)")
def test_a_writer_in_another_mount_namespace_is_still_refused(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A visible process of this host that reached the same file through another
    mount (its own mount namespace: a container, a systemd service with PrivateTmp or
    ProtectSystem, a snap; or a bind mount) and holds it open for writing gets the
    file refused, as one in this mount namespace does."""
    inbox, spec, folder = files
    monkeypatch.setattr(writers, "_ask", lambda fd: True)  # every lease: EAGAIN
    rec = folder / "rec.dat"
    rec.write_bytes(b"recording")
    manual.calibrate(spec)
    argv = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _HOLD]
    with holding([*argv, str(rec), "ab"]):
        items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert [i.relpath_str for i in items] == []
    assert [name for name, _why in refused] == ["rec.dat"]


def test_a_writer_through_a_shared_writable_mapping_is_still_refused(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A visible process that writes the file through a shared writable mapping (its
    descriptor closed, which the kernel still counts as open for writing) gets the
    file refused where leases cannot tell."""
    inbox, spec, folder = files
    rec = folder / "rec.dat"
    rec.write_bytes(b"\0" * 4096)
    with holding([sys.executable, "-c", _MAP, str(rec)]):
        fd = os.open(rec, os.O_RDONLY)
        try:  # the kernel's own answer, where leases work: a writer
            assert writers.open_for_writing(fd) is True
        finally:
            os.close(fd)
        monkeypatch.setattr(writers, "_ask", lambda fd: True)  # every lease: EAGAIN
        manual.calibrate(spec)
        items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert [i.relpath_str for i in items] == []
    assert [name for name, _why in refused] == ["rec.dat"]


def test_a_folder_whose_file_a_visible_writer_holds_is_not_deposited_and_removed(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder (a recording session) holding a file another process of this host
    still has open for writing, where leases cannot tell, is not deposited and removed
    from under that writer: refused, or put back with its file, never DONE."""
    inbox, spec, folder = files
    monkeypatch.setattr(writers, "_ask", lambda fd: True)  # every lease: EAGAIN
    session = folder / "session"
    session.mkdir()
    (session / "take1.dat").write_bytes(b"recorded")
    (session / "take2.dat").write_bytes(b"recording")
    manual.calibrate(spec)
    with held_open(session / "take2.dat"):
        items, refused = manual.journal_files(env.journal, inbox, ["session"], kind="dir", now=0.0)
        ends = [env.until(item, State.DONE) for item in items]
        assert all(item.state in FINAL for item in ends)
        assert [item.state for item in ends if item.state is State.DONE] == []
        assert (session / "take2.dat").read_bytes() == b"recording"
    assert len(refused) + len(items) == 1
