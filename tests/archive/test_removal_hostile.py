"""Hostile review of the repairs that act "from the archive's root without following a
link" (nbankd/archive/fsops.py open_below / remove_ours_at, nbankd/archive/removal.py,
nbankd/archive/access.py fix_access_below, nbankctl/checkarchive.py, tape prune).

Every test drives the real code against real files; the cases an unprivileged archive
owner meets run in a real subprocess as ``nobody`` (setpriv). Where an attacker's swap
must land at one instant inside a single call, the subprocess wraps ``os.open`` (the
kernel's answer is real; only the moment of the swap is chosen).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, store
from nbankctl import checkarchive
from nbankd.archive.opening import create_archive

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder under /tmp that ``nobody`` can reach (pytest's tmp_path is root's 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as an unprivileged archive owner")
    d = Path(tempfile.mkdtemp(prefix="nbank-removal-", dir="/tmp"))
    d.chmod(0o755)
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs a Python ``script`` (with nbankd importable) as user and group nobody."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", textwrap.dedent(script), *args],
        cwd="/", env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _nobody_archive(base: Path) -> Path:
    """A neurobank archive in ``base`` owned by nobody, as its non-root owner has it."""
    archive = create_archive(base / "arch", "https://registry.example/", shared=True)
    for dirpath, dirnames, filenames in os.walk(archive.path):
        for n in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, n), NOBODY, NOBODY, follow_symlinks=False)
    os.chown(archive.path, NOBODY, NOBODY)
    return archive.path


# --- the removal of a tree ------------------------------------------------------------------


def test_making_a_leftover_tree_writable_never_chmods_through_a_link(open_dir: Path) -> None:
    """Deleting a staging/ leftover (--fix, run by the archive's non-root owner) changes
    no mode outside the leftover: a sub-folder it cannot read, swapped for a link just
    after its open failed, never leads the chmod to the folder the link points to (it
    made that folder 0777, the link's own mode, read after the swap)."""
    root = _nobody_archive(open_dir)
    leftover = root / "staging" / "partial"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "part-0").write_bytes(b"half a transfer")
    (leftover / "sub").chmod(0o000)  # as an interrupted transfer may leave it
    victim = open_dir / "nobody-shared"  # the archive owner's folder others read
    victim.mkdir()
    (victim / "results.csv").write_bytes(b"read by the whole lab")
    victim.chmod(0o755)
    for p in (leftover, leftover / "sub", leftover / "part-0", victim, victim / "results.csv"):
        os.chown(p, NOBODY, NOBODY)

    proc = _as_nobody(
        """
        import os, sys
        from pathlib import Path
        from nbankctl.checkarchive import remove_leftover
        from nbankd.archive.opening import open_archive
        root, leftover, victim = sys.argv[1:4]
        real_open = os.open
        def open_then_swap(path, flags, mode=0o777, *, dir_fd=None):
            try:
                return real_open(path, flags, mode, dir_fd=dir_fd)
            except PermissionError:
                if path == "sub" and dir_fd is not None:
                    # the instant after the open failed: the empty folder becomes a link
                    os.rmdir("sub", dir_fd=dir_fd)
                    os.symlink(victim, "sub", dir_fd=dir_fd)
                raise
        os.open = open_then_swap
        try:
            remove_leftover(open_archive(root), Path(leftover))
        except OSError as err:
            print("refused:", err)
        """,
        str(root), str(leftover), str(victim),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755, (
        f"deleting {leftover} made {victim} (outside the archive) mode "
        f"{oct(stat.S_IMODE(victim.stat().st_mode))}: {proc.stdout}{proc.stderr}"
    )


def test_its_owner_deletes_a_leftover_whose_top_folder_it_cannot_read(open_dir: Path) -> None:
    """The archive's non-root owner deletes its own staging/ leftover whose top folder
    has mode 000 (its sub-folders of mode 000 are already handled; remove_ours removed
    such a folder before this change)."""
    root = _nobody_archive(open_dir)
    leftover = root / "staging" / "partial"
    leftover.mkdir()
    (leftover / "part-0").write_bytes(b"half a transfer")
    os.chown(leftover / "part-0", NOBODY, NOBODY)
    os.chown(leftover, NOBODY, NOBODY)
    leftover.chmod(0o000)

    proc = _as_nobody(
        """
        import sys
        from pathlib import Path
        from nbankctl.checkarchive import remove_leftover
        from nbankd.archive.opening import open_archive
        remove_leftover(open_archive(sys.argv[1]), Path(sys.argv[2]))
        """,
        str(root), str(leftover),
    )  # fmt: skip
    assert proc.returncode == 0 and not leftover.exists(), proc.stderr


# --- --fix of modes ---------------------------------------------------------------------------


def test_fix_permissions_without_proc_fixes_the_mode_or_says_why(
    backend: Backend, tmp_path: Path
) -> None:
    """Where /proc is not mounted (a chroot, a minimal container) --fix still sets a
    stored file's mode, or names the cause; it never reports an existing file as 'No
    such file or directory'."""
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "umount -l /proc && test ! -e /proc/self"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip("cannot unmount /proc in a private mount namespace here")
    archive, arch = backend.archive()
    data = backend.blob("modes")
    name = backend.resource(data, arch)
    path = store(archive, name, data)
    path.chmod(0o600)

    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'umount -l /proc && exec "$@"', "sh",
         NBANKCTL, *backend.before, "check", "archive", "--fix", str(archive.path)],
        env=backend.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "No such file or directory" not in proc.stderr, proc.stderr
    fixed = stat.S_IMODE(path.stat().st_mode) == 0o444
    assert fixed or (f"cannot fix {path}" in proc.stderr and "/proc" in proc.stderr), proc.stderr


def test_fix_permissions_never_changes_a_file_that_also_lives_outside(
    backend: Backend, tmp_path: Path
) -> None:
    """--fix run as root changes no owner or mode of a file outside the archive: a
    stored name that is a hard link to someone's private file (nlink > 1) is left as
    it is and reported, not chowned and made world-readable."""
    archive, arch = backend.archive()
    home = tmp_path / "someone"
    home.mkdir()
    private = home / "id_ed25519"
    data = backend.blob("someone's private key")
    private.write_bytes(data)  # the registered bytes: the only finding is the mode
    os.chown(private, NOBODY, NOBODY)
    private.chmod(0o600)
    name = backend.resource(data, arch)
    stored = store(archive, name, data)
    stored.unlink()
    os.link(private, stored)  # anyone who may write the stub folder and read+write the file

    proc = backend.ctl("check", "archive", "--fix", str(archive.path))
    st = private.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600), (
        f"--fix changed {private} (outside the archive) to uid {st.st_uid} mode "
        f"{oct(stat.S_IMODE(st.st_mode))}:\n{proc.stderr}"
    )


# --- what a deletion that fails reports ---------------------------------------------------------


def test_prune_reports_a_copy_it_cannot_delete_and_goes_on(
    backend: Backend, tmp_path: Path
) -> None:
    """tape prune whose deletion is refused (a stub folder that is a link: open_below
    fails) reports that identifier as failed, keeps its location, and still prunes the
    next identifiers; it does not end with a traceback after dropping the location."""
    archive, arch = backend.archive()
    other, other_name = backend.archive("other")
    ids = []
    for label in ("aa-linked", "zz-plain"):
        data = backend.blob(label)
        id = backend.resource(data, arch, name=label[:2] + backend.name())
        store(archive, id, data)
        store(other, id, data)
        backend.registry.add_location(id, other_name)
        ids.append(id)
    linked, plain = ids
    stub = archive.resources_dir / linked[:2]
    elsewhere = tmp_path / "elsewhere"
    os.rename(stub, elsewhere)  # the stub folder now lives outside, a link in its place
    stub.symlink_to(elsewhere)

    proc = backend.ctl("tape", "prune", arch, "-", input="\n".join(ids) + "\n")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (elsewhere / f"{linked}.dat").exists(), proc.stderr
    assert arch in backend.registry.get_resource(linked).locations, (  # type: ignore[union-attr]
        f"prune dropped {arch} from {linked}'s locations but kept its file:\n{proc.stderr}"
    )
    assert not archive.stored_path(plain), proc.stderr


# --- the second-copy check ---------------------------------------------------------------------


def test_fix_asks_about_the_next_copy_when_a_second_location_cannot_be_read(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy whose other location cannot be read back (a stored folder there holds a
    link to a file) is kept as unverified; --fix still asks about the next copy rather
    than ending with that location's error."""
    archive, arch = backend.archive()
    other, other_name = backend.archive("other")
    # "aa..." (a folder, whose other copy holds a link) sorts before "zz..." (a file)
    folder_id = "aa" + backend.name()
    ours = archive.resources_dir / folder_id[:2] / folder_id
    (ours / "d").mkdir(parents=True)
    (ours / "d" / "x.bin").write_bytes(b"folder data")
    theirs = other.resources_dir / folder_id[:2] / folder_id
    (theirs / "d").mkdir(parents=True)
    (theirs / "d" / "x.bin").symlink_to(ours / "d" / "x.bin")
    from nbankd.hashing import directory_hash

    backend.registry.add_resource(
        dtype=backend.dtype, archive=other_name, name=folder_id, sha1=directory_hash(ours)
    )
    data = backend.blob("file")
    file_id = backend.resource(data, other_name, name="zz" + backend.name())
    store(archive, file_id, data)
    store(other, file_id, data)

    report = checkarchive.check_archive(archive, backend.registry, arch)
    monkeypatch.setattr("sys.stdin", io.StringIO("s\ns\n"))
    said: list[str] = []
    try:
        checkarchive.resolve_at_terminal(backend.registry, archive, arch, report, said.append)
    except Exception as err:
        pytest.fail(f"--fix ended at {folder_id}'s other copy: {err!r}\n{said}")
    assert any(file_id in s for s in said), said


# --- guards (pass today): legitimate use by a non-root owner ------------------------------------


def test_guard_non_root_owner_fixes_mode_000_entries_and_removes_a_read_only_tree(
    open_dir: Path,
) -> None:
    """GUARD (passes): the archive's non-root owner, reaching the archive through a
    symlinked root, fixes a file and a folder of mode 000 and removes a stored folder
    copy whose folders are read-only (0555, as read_only_resources leaves them)."""
    root = _nobody_archive(open_dir)
    alias = open_dir / "alias"
    alias.symlink_to(root)
    stub = root / "resources" / "ab"
    (stub / "abfolder").mkdir(parents=True)
    (stub / "abfile.dat").write_bytes(b"x")
    (stub / "abcopy" / "sub").mkdir(parents=True)
    (stub / "abcopy" / "sub" / "f").write_bytes(b"y")
    for dirpath, dirnames, filenames in os.walk(stub):
        for n in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, n), NOBODY, NOBODY)
    os.chown(stub, NOBODY, NOBODY)
    (stub / "abfolder").chmod(0o000)
    (stub / "abfile.dat").chmod(0o000)
    for d in (stub / "abcopy" / "sub", stub / "abcopy"):
        d.chmod(0o555)

    proc = _as_nobody(
        """
        import sys
        from pathlib import Path
        from nbankd.archive.access import fix_access_below
        from nbankd.archive.opening import open_archive
        from nbankd.archive.removal import remove_stored_copy
        archive = open_archive(sys.argv[1])
        stub = archive.resources_dir / "ab"
        for name in ("abfolder", "abfile.dat"):
            fix_access_below(archive, stub / name, None)
        remove_stored_copy(archive, stub / "abcopy")
        """,
        str(alias),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((stub / "abfolder").stat().st_mode) == 0o555
    assert stat.S_IMODE((stub / "abfile.dat").stat().st_mode) == 0o444
    assert not (stub / "abcopy").exists()
