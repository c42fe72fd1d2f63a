"""Hostile review of ``nbankctl check archive --fix`` and the audit: what the repair
path moves, removes or chmods when the archive changes under it.

Every test drives the real code against real files. The swaps happen at an instant
the real command gives an attacker (or an unlucky lab): after the walk, while the
stored files are being read (the ``reading`` audit pause point, which the check
shares with the daemon's audit), or while a question waits at the terminal.
"""

from __future__ import annotations

import io
import os
import pty
import select
import stat
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, store
from fixtures.daemon import wait_for
from nbankctl import checkarchive
from nbankd.archive.access import apply_access
from nbankd.audit.model import INCOMPLETE, MISPLACED


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _swap_for_link(folder: Path, target: Path, stash: Path) -> None:
    """Moves ``folder`` out of the way and puts a symbolic link to ``target`` in its place."""
    os.rename(folder, stash)
    os.symlink(target, folder)


def _run_paused_at_reading(
    backend: Backend,
    argv: list[str],
    gate: Path,
    when_paused: callable,  # type: ignore[valid-type]
) -> subprocess.CompletedProcess[str]:
    """Runs ``nbankctl ARGV`` held at the audit pause point ``reading`` (the walk done,
    the first file's first block read); calls ``when_paused`` there, then lets it go."""
    env = dict(backend.env)
    env["NBANKD_AUDIT_PAUSE_AT"] = "reading"
    env["NBANKD_AUDIT_PAUSE_UNTIL"] = str(gate)
    proc = subprocess.Popen(
        [NBANKCTL, *backend.before, *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: Path(f"{gate}.reached").exists() or proc.poll() is not None, 60,
                 "the check to reach the reading pause")  # fmt: skip
        assert proc.poll() is None, proc.communicate()
        when_paused()
        gate.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- --fix after the walk: a stub folder swapped for a link ---------------------------------


def test_fix_permissions_never_chmods_through_a_stub_folder_swapped_for_a_link(
    backend: Backend, tmp_path: Path
) -> None:
    """--fix sets modes only on entries inside the archive: a stub folder swapped for a
    link after the walk never leads its chmod (run as root: chown too) outside."""
    archive, arch = backend.archive()
    data = backend.blob("private")
    name = backend.resource(data, arch)
    path = store(archive, name, data)
    path.chmod(0o600)  # a permission finding: resources must be readable
    victim_dir = tmp_path / "home-of-someone"
    victim_dir.mkdir()
    victim = victim_dir / path.name
    victim.write_bytes(b"someone's private key")
    victim.chmod(0o600)

    proc = _run_paused_at_reading(
        backend,
        ["check", "archive", "--fix", str(archive.path)],
        tmp_path / "go",
        lambda: _swap_for_link(path.parent, victim_dir, tmp_path / "stash"),
    )
    assert f"{path}" in proc.stderr, proc.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, (
        f"--fix made {victim} (outside the archive) mode "
        f"{oct(stat.S_IMODE(victim.stat().st_mode))}:\n{proc.stderr}"
    )


def test_fix_misplaced_never_moves_a_file_in_from_outside_through_a_swapped_stub(
    backend: Backend, tmp_path: Path
) -> None:
    """--fix refiles only the misplaced file the walk found: its stub folder swapped for
    a link to another folder after the walk never moves that folder's file into the
    archive (out of its owner's folder)."""
    archive, arch = backend.archive()
    data = backend.blob("kept")
    kept = backend.resource(data, arch)
    store(archive, kept, data)  # a stored file, so the check reads one and pauses
    wrong = backend.resource(backend.blob("wrong"), arch)
    stray_stub = archive.resources_dir / "zz"
    stray_stub.mkdir()
    misplaced = stray_stub / f"{wrong}.dat"
    misplaced.write_bytes(backend.blob("wrong"))
    apply_access(archive, stray_stub)
    apply_access(archive, misplaced)
    victim_dir = tmp_path / "someone-else"
    victim_dir.mkdir()
    victim = victim_dir / misplaced.name
    victim.write_bytes(b"someone else's recording, not in any archive")

    before = checkarchive.check_archive(archive, backend.registry, arch)
    assert [f.kind for f in before.findings] == [MISPLACED], before.findings

    proc = _run_paused_at_reading(
        backend,
        ["check", "archive", "--fix", str(archive.path)],
        tmp_path / "go",
        lambda: _swap_for_link(stray_stub, victim_dir, tmp_path / "stash"),
    )
    assert victim.exists(), f"--fix moved {victim} (outside the archive) into it:\n{proc.stderr}"


# --- at the terminal: the question waits, the folder is swapped ------------------------------


class _AnswerAfter(io.StringIO):
    """Standard input whose user types ``answer`` after ``meanwhile`` happened (what
    anyone with write access to the archive can do while the question waits)."""

    def __init__(self, answer: str, meanwhile: callable) -> None:  # type: ignore[valid-type]
        super().__init__()
        self._answer, self._meanwhile = answer, meanwhile

    def readline(self, *_args: object) -> str:  # type: ignore[override]
        if self._meanwhile is not None:
            self._meanwhile()
            self._meanwhile = None
        return self._answer


def test_deleting_a_leftover_never_follows_staging_swapped_for_a_link(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answering [d]elete about a staging/ leftover deletes that leftover only: staging/
    swapped for a link while the question waits never leads the removal outside."""
    archive, arch = backend.archive()
    leftover = archive.staging_dir / "results"
    leftover.mkdir()
    (leftover / "part").write_bytes(b"x")
    report = checkarchive.check_archive(archive, backend.registry, arch)
    assert [f.kind for f in report.findings] == [INCOMPLETE], report.findings
    victim_dir = tmp_path / "lab-share"
    (victim_dir / "results").mkdir(parents=True)
    (victim_dir / "results" / "thesis-data.csv").write_bytes(b"five years of work")
    # the leftover must look an hour old to be offered; a ctime cannot be set back
    monkeypatch.setattr(checkarchive, "LEFTOVER_AGE", 0.0)
    monkeypatch.setattr(
        "sys.stdin",
        _AnswerAfter(
            "d\n", lambda: _swap_for_link(archive.staging_dir, victim_dir, tmp_path / "stash")
        ),
    )
    said: list[str] = []
    checkarchive.resolve_at_terminal(backend.registry, archive, arch, report, said.append)
    assert (victim_dir / "results" / "thesis-data.csv").exists(), said


def _read_until(fd: int, needle: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    """Reads ``fd`` until ``needle`` shows (the question is asked); returns what was read."""
    got = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in got:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, got.decode(errors="replace")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk
    return got.decode(errors="replace")


def _at_terminal(
    backend: Backend,
    argv: list[str],
    prompt: str,
    answer: bytes,
    meanwhile: callable,  # type: ignore[valid-type]
) -> tuple[int, str]:
    """Runs ``nbankctl ARGV`` with a terminal for standard input; once ``prompt`` shows on
    standard error runs ``meanwhile`` and types ``answer``. Returns (status, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [NBANKCTL, *backend.before, *argv],
        env=backend.env,
        stdin=slave,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        head = _read_until(proc.stderr.fileno(), prompt, proc)
        meanwhile()
        os.write(master, answer)
        rest = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    return proc.returncode, head + rest


def test_deleting_a_verified_copy_never_follows_a_stub_folder_swapped_for_a_link(
    backend: Backend, tmp_path: Path
) -> None:
    """Answering [d]elete about a verified copy of a resource held elsewhere deletes that
    copy only: its stub folder swapped for a link while the question waits never leads
    the removal outside the archive."""
    archive, _arch = backend.archive()
    other, other_name = backend.archive("other")
    data = backend.blob("copy")
    name = backend.resource(data, other_name)
    store(other, name, data)
    copy = store(archive, name, data)
    victim_dir = tmp_path / "someone"
    victim_dir.mkdir()
    victim = victim_dir / copy.name
    victim.write_bytes(b"not a copy of anything")

    _status, err = _at_terminal(
        backend,
        ["check", "archive", "--fix", str(archive.path)],
        "[s]kip? ",
        b"d\n",
        lambda: _swap_for_link(copy.parent, victim_dir, tmp_path / "stash"),
    )
    assert "a copy of" in err, err
    assert victim.exists(), f"--fix deleted {victim}, outside the archive:\n{err}"


# --- what --fix offers to delete -------------------------------------------------------------


def test_fix_never_deletes_a_copy_whose_other_location_does_not_hold_it(
    backend: Backend, tmp_path: Path
) -> None:
    """A copy whose SHA-1 matched but whose registered location holds no file is the only
    copy of the registered bytes: --fix does not delete it (as tape prune needs a
    verified second location), whatever the answer."""
    archive, _arch = backend.archive()
    _other, other_name = backend.archive("other")  # on this host, and empty
    data = backend.blob("only")
    name = backend.resource(data, other_name)
    copy = store(archive, name, data)

    _status, err = _at_terminal(
        backend, ["check", "archive", "--fix", str(archive.path)], "[s]kip? ", b"d\n",
        lambda: None,
    )  # fmt: skip
    assert copy.exists(), (
        f"--fix deleted the only copy of {name} (its other location holds nothing):\n{err}"
    )


# --- odd names ---------------------------------------------------------------------------------


def _undecodable_stray(archive_resources: Path, stub: str) -> bytes:
    """A stray file whose name is not UTF-8 (as a Windows share or an old tar leaves),
    in stub folder ``stub``, older than any grace; returns its path as bytes."""
    folder = archive_resources / stub
    folder.mkdir(exist_ok=True)
    path = os.fsencode(folder) + b"/" + stub.encode() + b"\xff\xfe.dat"
    with open(path, "wb") as f:
        f.write(b"a stray file")
    os.chmod(path, 0o444)  # a resource's mode: only its name is odd
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


def test_check_archive_reports_a_stray_file_with_an_undecodable_name(backend: Backend) -> None:
    """A stray file whose name is not UTF-8 is reported (missing from the registry);
    the check of the rest of the archive still runs and ends with its summary."""
    archive, arch = backend.archive()
    data = backend.blob("fine")
    name = backend.resource(data, arch)
    store(archive, name, data)
    _undecodable_stray(archive.resources_dir, name[:2])
    proc = subprocess.run(
        [NBANKCTL, *backend.before, "check", "archive", str(archive.path)],
        env=backend.env, capture_output=True, timeout=120,
    )  # fmt: skip
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert proc.returncode == 1 and "missing from registry: 1" in err, err


def test_audit_reports_a_stray_file_with_an_undecodable_name(tmp_path: Path) -> None:
    """One stray file whose name is not UTF-8 does not make the audit fail: the audit
    completes, reports it, and still reports the archive's other problems."""
    from audit_helpers import make_setup

    from nbankd.audit.api import run_audit
    from nbankd.audit.model import HASH_MISMATCH, MISSING_FROM_REGISTRY
    from nbankd.audit.settings import AuditSettings

    s = make_setup(tmp_path, n=3)
    try:
        _undecodable_stray(s.archive.resources_dir, "re")
        corrupt = next((s.archive.resources_dir / "re").glob("res000*"))
        corrupt.chmod(0o644)
        corrupt.write_bytes(b"bit rot")
        corrupt.chmod(0o444)
        try:
            report = run_audit(
                [s.target], s.registry, s.state, full=True,
                settings=AuditSettings(staging_grace=0),  # its ctime is now: no grace
            )  # fmt: skip
        except UnicodeError as err:
            pytest.fail(f"the audit failed on the undecodable name: {err!r}")
        kinds = sorted(f.kind for a in report.archives for f in a.findings)
        assert kinds == sorted([HASH_MISMATCH, MISSING_FROM_REGISTRY]), kinds
    finally:
        s.registry.close()


def test_audit_reports_a_folder_resource_holding_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    """A registered folder resource holding a file whose name is not UTF-8 has no
    neurobank hash: the audit completes and reports it unreadable, naming the file."""
    from audit_helpers import make_setup

    from nbankd.audit.api import run_audit
    from nbankd.audit.model import UNREADABLE
    from nbankd.audit.settings import AuditSettings

    s = make_setup(tmp_path, n=1)
    try:
        s.registry.add_resource(dtype="dat", archive="arch", name="fold1", sha1="0" * 40)
        folder = s.archive.resources_dir / "fo" / "fold1"
        folder.mkdir(parents=True)
        member = os.fsencode(folder) + b"/bad\xff.dat"
        with open(member, "wb") as f:
            f.write(b"a member")
        apply_access(s.archive, Path(os.fsdecode(member)))
        apply_access(s.archive, folder.parent)
        apply_access(s.archive, folder)
        report = run_audit(
            [s.target], s.registry, s.state, full=True, settings=AuditSettings(staging_grace=0)
        )
        [archive] = report.archives
        assert archive.error is None, archive.error
        found = [f for f in archive.findings if f.resource == "fold1"]
        assert [f.kind for f in found] == [UNREADABLE], found
        assert "not verifiable" in found[0].detail and "bad" in found[0].detail, found
    finally:
        s.registry.close()
