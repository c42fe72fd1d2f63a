"""Hostile review of ``nbankctl deposit``: an unlucky lab, and someone who can write the
folder holding the files. Each test names a problem the review found (fixed) or an attack
that already held."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, json_stream, make_backend, store
from fixtures.daemon import wait_for
from nbankd.archive.layout import Archive
from nbankd.daemon import statelock
from nbankd.seams import DEPOSIT_POINTS

REJECT_POINTS = (
    "after-reject-name",
    "after-reason-temp",
    "after-reject-reason",
    "after-reject-move",
)
#: seams a plain deposit reaches (after-put-back needs an input changed mid-claim; a
#: deposit by hand drives its items' steps one by one, never in the daemon's rounds)
DEPOSIT_SEAMS = [
    p
    for p in DEPOSIT_POINTS
    if p not in REJECT_POINTS and p not in ("after-put-back", "after-round-fsyncs")
]


def entries(folder: Path) -> list[str]:
    """Every entry under ``folder`` (relative paths, folders too), sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def stored(archive: Archive) -> list[str]:
    return sorted(
        str(p.relative_to(archive.resources_dir))
        for p in archive.resources_dir.rglob("*")
        if p.is_file()
    )


def rig(backend: Backend, name: str = "rig") -> Path:
    folder = backend.tmp / name
    folder.mkdir(exist_ok=True)
    return folder


def run(
    backend: Backend,
    archive: Archive,
    *argv: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``nbankctl [-r URL] deposit ARCHIVE -d DTYPE ARGV``."""
    return subprocess.run(
        [NBANKCTL, *backend.before, "deposit", str(archive.path), "-d", backend.dtype, *argv],
        env=dict(backend.env, **(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def crash_at(backend: Backend, archive: Archive, point: str, *argv: str) -> None:
    r = run(backend, archive, *argv, env={"NBANKD_CRASH_AT": point})
    assert r.returncode == -9, r.stderr


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The embedded registry alone (its state_dir holds the registry's database)."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


# --- files that belong to nbankd or the archive ---------------------------------------


def test_the_registry_database_in_state_dir_is_refused_and_stays(embedded: Backend) -> None:
    """A file inside the daemon's state_dir (here the embedded registry) is refused by
    name (exit 1) and never moved."""
    archive, _ = embedded.archive()
    database = embedded.tmp / "state" / "registry.sqlite3"
    before = database.stat().st_ino
    r = run(embedded, archive, str(database))
    assert database.exists() and database.stat().st_ino == before
    assert r.returncode == 1 and str(database) in r.stderr
    assert stored(archive) == []


def test_a_stored_resource_is_never_claimed_out_of_the_archive(backend: Backend) -> None:
    """A file already in the archive's resources/ is refused before any claim: killed
    right after the claim's rename point, the stored file is still in its place."""
    archive, name = backend.archive()
    data = backend.blob("stored")
    path = store(archive, backend.resource(data, name), data)
    run(backend, archive, str(path), env={"NBANKD_CRASH_AT": "after-claim-rename"})
    assert path.read_bytes() == data
    assert entries(path.parent) == [path.name]  # no .nbank or nbank-rejected in the stub


def test_a_file_in_the_archive_staging_folder_is_refused(embedded: Backend) -> None:
    """A file inside ARCHIVE/staging/ is refused by name (exit 1) and left in place."""
    archive, _ = embedded.archive()
    src = archive.staging_dir / f"{embedded.name('s')}.dat"
    src.write_bytes(embedded.blob("staged"))
    r = run(embedded, archive, str(src))
    assert r.returncode == 1 and str(src) in r.stderr
    assert src.exists() and stored(archive) == []


def test_the_work_folder_given_as_an_input_is_skipped(embedded: Backend) -> None:
    """``--zip-directories FOLDER/.nbank`` is skipped by name (nbankd's own folder, never
    journaled), and the next run has nothing left unfinished (exit 0)."""
    archive, _ = embedded.archive()
    folder = rig(embedded)
    src = folder / f"{embedded.name('w')}.dat"
    src.write_bytes(embedded.blob("w"))
    crash_at(embedded, archive, "after-register", str(src))  # leaves FOLDER/.nbank
    r = run(embedded, archive, "--zip-directories", str(folder / ".nbank"))
    assert "nbankd's own folder" in r.stderr and "kept safe" not in r.stderr
    assert stored(archive) == [f"{src.stem[:2]}/{src.name}"]
    again = run(embedded, archive)
    assert again.returncode == 0, again.stderr


def test_the_rejected_folder_given_as_an_input_is_refused(embedded: Backend) -> None:
    """``--zip-directories FOLDER/nbank-rejected`` holding a refused file is refused by
    name (exit 1); nothing is registered and the held file stays."""
    archive, name = embedded.archive()
    folder = rig(embedded)
    data = embedded.blob("dup")
    embedded.resource(data, name)
    dup = folder / "dup.dat"
    dup.write_bytes(data)
    crash_at(embedded, archive, "after-reject-move", str(dup))  # held in nbank-rejected
    held = folder / "nbank-rejected"
    r = run(embedded, archive, "--zip-directories", str(held))
    assert r.returncode == 1 and str(held) in r.stderr
    assert embedded.registry.get_resource("nbank-rejected") is None
    assert stored(archive) == []


# --- the same file twice --------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same path", "through a linked folder"])
def test_one_file_named_twice_is_deposited_once_and_exits_0(
    embedded: Backend, spelling: str
) -> None:
    """The same file named twice (as given, or through a symlinked folder) is deposited
    once, the run exits 0, and no line calls it vanished."""
    archive, _ = embedded.archive()
    folder = rig(embedded)
    src = folder / f"{embedded.name('t')}.dat"
    src.write_bytes(embedded.blob("twice"))
    alias = src
    if spelling != "same path":
        (embedded.tmp / "alias").symlink_to(folder)
        alias = embedded.tmp / "alias" / src.name
    r = run(embedded, archive, "-j", str(src), str(alias))
    assert stored(archive) == [f"{src.stem[:2]}/{src.name}"]
    assert "vanished" not in r.stderr
    assert r.returncode == 0, r.stderr


# --- a file still being written -------------------------------------------------------


def test_a_file_still_open_for_writing_never_alters_the_stored_copy(embedded: Backend) -> None:
    """A file a program still holds open for writing is either refused (named, left in
    place) or stored as a copy: bytes it writes afterwards never change what the
    archive holds under the registered SHA-1."""
    archive, _ = embedded.archive()
    src = rig(embedded) / f"{embedded.name('g')}.dat"
    src.write_bytes(embedded.blob("growing"))
    with open(src, "ab") as writer:
        r = run(embedded, archive, str(src))
        writer.write(b"the recording goes on")
    record = embedded.registry.get_resource(src.stem)
    if r.returncode == 0:
        assert record is not None
        data = (archive.resources_dir / src.stem[:2] / src.name).read_bytes()
        assert hashlib.sha1(data).hexdigest() == record.sha1
    else:
        assert str(src) in r.stderr and src.exists() and record is None


# --- interrupted runs -----------------------------------------------------------------


def test_a_refused_file_is_handed_back_after_the_run_is_killed(embedded: Backend) -> None:
    """A duplicate refused early in a run killed later (by another file's crash) is put
    back in its place by the next run, which names it."""
    archive, name = embedded.archive()
    folder = rig(embedded)
    data = embedded.blob("dup")
    embedded.resource(data, name)
    dup, good = folder / "aaa.dat", folder / "bbb.dat"
    dup.write_bytes(data)
    good.write_bytes(embedded.blob("good"))
    crash_at(embedded, archive, "after-register", str(dup), str(good))
    r = run(embedded, archive)
    assert stored(archive) == ["bb/bbb.dat"]
    assert dup.read_bytes() == data
    assert str(dup) in r.stderr


def test_the_run_that_finishes_an_interrupted_deposit_tidies_its_folder(
    embedded: Backend,
) -> None:
    """After a kill and the run that finishes it, the files' folder holds no .nbank or
    nbank-rejected folder, so a later ``deposit ARCHIVE FOLDER/*`` is not tripped."""
    archive, _ = embedded.archive()
    folder = rig(embedded)
    src = folder / f"{embedded.name('c')}.dat"
    src.write_bytes(embedded.blob("crash"))
    crash_at(embedded, archive, "after-register", str(src))
    assert run(embedded, archive).returncode == 0
    assert entries(folder) == []


@pytest.mark.parametrize("point", DEPOSIT_SEAMS)
def test_a_kill_at_any_deposit_seam_is_finished_by_the_next_run(
    embedded: Backend, point: str
) -> None:
    """Killed at each seam, the next bare run deposits the file exactly once, intact."""
    archive, _ = embedded.archive()
    src = rig(embedded) / f"{embedded.name('k')}.dat"
    data = embedded.blob("kill")
    src.write_bytes(data)
    crash_at(embedded, archive, point, str(src))
    r = run(embedded, archive, "-j")
    assert r.returncode == 0, r.stderr
    assert json_stream(r.stdout) == [{"source": str(src), "id": src.stem}]
    assert stored(archive) == [f"{src.stem[:2]}/{src.name}"]
    assert (archive.resources_dir / src.stem[:2] / src.name).read_bytes() == data
    assert not src.exists()


@pytest.mark.parametrize("point", REJECT_POINTS)
def test_a_kill_while_refusing_puts_the_file_back_on_the_next_run(
    embedded: Backend, point: str
) -> None:
    """Killed while a duplicate is being refused, the next run puts it back (exit 1,
    naming the resource that holds the bytes) and registers nothing."""
    archive, name = embedded.archive()
    data = embedded.blob("dup")
    first = embedded.resource(data, name)
    src = rig(embedded) / f"{embedded.name('d')}.dat"
    src.write_bytes(data)
    crash_at(embedded, archive, point, str(src))
    r = run(embedded, archive, "-j")
    assert r.returncode == 1
    [line] = json_stream(r.stdout)
    assert line["source"] == str(src) and first in line["error"]
    assert src.read_bytes() == data and stored(archive) == []


# --- two runs at once -----------------------------------------------------------------


def _waiting_on(state: Path) -> bool:
    """Whether some process is blocked on the state folder's lock (/proc/locks): the
    folder's own flock, taken first, or its lock file's."""
    inos = {os.stat(p).st_ino for p in (state, state / statelock.LOCK_NAME)}
    with open("/proc/locks") as f:
        return any("->" in line and int(line.split()[-3].rsplit(":", 1)[1]) in inos for line in f)


def test_a_file_deposited_by_a_concurrent_run_is_named_not_a_traceback(
    django_backend: Backend,
) -> None:
    """A second run waiting for the first's lock, whose file the first deposited
    meanwhile, names the file as gone (exit 1) without a traceback."""
    b = django_backend
    archive, _ = b.archive()
    src = rig(b) / f"{b.name('c')}.dat"
    src.write_bytes(b.blob("race"))
    state = Path(b.env["HOME"]) / ".local" / "state" / "nbankctl"
    state.mkdir(parents=True, exist_ok=True)
    held = statelock.acquire(state)  # the first run, mid-deposit
    try:
        second = subprocess.Popen(
            [NBANKCTL, *b.before, "deposit", str(archive.path), "-d", b.dtype, str(src)],
            env=b.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: _waiting_on(state), 60, "the second run to wait")
        src.rename(b.tmp / "taken-by-the-first-run.dat")
    finally:
        held.release()
    _, err = second.communicate(timeout=120)
    assert "Traceback" not in err
    assert second.returncode == 1 and str(src) in err


# --- attacks that hold ----------------------------------------------------------------


def test_a_relative_path_with_dotdot_is_deposited_and_reported_absolute(
    embedded: Backend,
) -> None:
    """``../rig/FILE`` from another folder is deposited; its -j source is absolute."""
    archive, _ = embedded.archive()
    src = rig(embedded) / f"{embedded.name('r')}.dat"
    src.write_bytes(embedded.blob("rel"))
    elsewhere = rig(embedded, "elsewhere")
    r = run(embedded, archive, "-j", f"../rig/{src.name}", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert json_stream(r.stdout) == [{"source": str(src), "id": src.stem}]


def test_a_folder_swapped_for_a_link_after_journaling_takes_nothing_through_it(
    embedded: Backend,
) -> None:
    """Killed after journaling, with the folder then swapped for a link to another
    folder holding a same-named file: the next run deposits nothing and that file
    stays untouched."""
    archive, _ = embedded.archive()
    folder = rig(embedded)
    src = folder / f"{embedded.name('s')}.dat"
    src.write_bytes(embedded.blob("mine"))
    crash_at(embedded, archive, "after-journal-add", str(src))
    victim = rig(embedded, "victim")
    (victim / src.name).write_bytes(embedded.blob("victim"))
    folder.rename(embedded.tmp / "moved")
    folder.symlink_to(victim)
    r = run(embedded, archive)
    assert r.returncode == 1
    assert stored(archive) == []
    assert (victim / src.name).read_bytes() == embedded.blob("victim")
    assert (embedded.tmp / "moved" / src.name).read_bytes() == embedded.blob("mine")


def test_zipping_a_folder_with_links_is_refused_and_the_folder_kept(embedded: Backend) -> None:
    """``--zip-directories`` on a folder holding a symlink names the link (exit 1),
    stores nothing and leaves the folder and its link as they were."""
    archive, _ = embedded.archive()
    folder = rig(embedded) / embedded.name("z")
    folder.mkdir()
    (folder / "a.txt").write_bytes(embedded.blob("a"))
    secret = embedded.tmp / "secret.txt"
    secret.write_bytes(b"not to be zipped")
    (folder / "link.txt").symlink_to(secret)
    r = run(embedded, archive, "--zip-directories", str(folder))
    assert r.returncode == 1 and "link.txt" in r.stderr
    assert stored(archive) == []
    assert entries(folder) == ["a.txt", "link.txt"] and (folder / "link.txt").is_symlink()


def test_a_file_replaced_after_journaling_is_not_deposited(
    embedded: Backend,
) -> None:
    """Killed after journaling, with the file then replaced by another of that name, the
    next run deposits neither: the replacement stays where it is."""
    archive, _ = embedded.archive()
    folder = rig(embedded)
    src = folder / f"{embedded.name('x')}.dat"
    src.write_bytes(embedded.blob("original"))
    crash_at(embedded, archive, "after-journal-add", str(src))
    src.rename(folder.parent / "original.dat")
    src.write_bytes(embedded.blob("replacement"))
    r = run(embedded, archive)
    assert r.returncode == 1
    assert src.read_bytes() == embedded.blob("replacement") and stored(archive) == []


def test_a_file_the_registry_refuses_stays_and_the_refusal_is_named(
    django_backend: Backend,
) -> None:
    """django-neurobank's 400 (an unknown experimenter) refuses the file: exit 1, the
    file is back in place, the folder clean, and the message names file and field."""
    b = django_backend
    archive, _ = b.archive()
    folder = rig(b)
    src = folder / f"{b.name('e')}.dat"
    src.write_bytes(b.blob("refused"))
    r = run(b, archive, "--experimenter", "no-such-user", str(src))
    assert r.returncode == 1
    assert src.read_bytes() == b.blob("refused") and entries(folder) == [src.name]
    assert str(src) in r.stderr and "experimenter" in r.stderr
    assert b.registry.get_resource(src.stem) is None


def test_a_hard_linked_file_is_refused_as_hard_linked(embedded: Backend) -> None:
    """A file with another hard link (a backup's) stays in place (exit 1) and the
    message names the file and its hard link, not a vanished file."""
    archive, _ = embedded.archive()
    folder = rig(embedded)
    src = folder / f"{embedded.name('h')}.dat"
    src.write_bytes(embedded.blob("linked"))
    os.link(src, embedded.tmp / "backup.dat")
    r = run(embedded, archive, str(src))
    assert r.returncode == 1 and entries(folder) == [src.name]
    assert str(src) in r.stderr and "hard link" in r.stderr
