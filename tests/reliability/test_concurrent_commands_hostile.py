"""Hostile review: two commands acting on the same data at once, as in a lab where two
people (or a cron job and a person) work on one archive. Each race is lined up with the
product's pause seams, or with the embedded registry's own write lock held by the test
(another writer of the registry, as a daemon's round would be), never with sleeps."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import sqlite3
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, make_tar, store
from fixtures.daemon import wait_for
from nbankd.archive.layout import Archive

IN_ACCESS = 0x01
IN_CLOSE_NOWRITE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The embedded registry alone (nothing left on the shared django server)."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


@contextlib.contextmanager
def registry_write_lock(backend: Backend) -> Iterator[None]:
    """Holds the embedded registry's write lock (BEGIN IMMEDIATE) as another writer
    would: readers go on, every writer waits until the block ends."""
    conn = sqlite3.connect(backend.tmp / "state" / "registry.sqlite3", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("COMMIT")
    finally:
        conn.close()


class ReadWatch:
    """inotify on files: tells when another process has opened one for reading and
    closed it again (a hash of the copy, finished), or, for those given as
    ``accessed``, read from it (a tar kept open while its members are imported)."""

    def __init__(self, paths: list[Path], accessed: tuple[Path, ...] = ()) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self.wds: dict[int, Path] = {}
        for path in [*paths, *accessed]:
            mask = IN_ACCESS if path in accessed else IN_CLOSE_NOWRITE
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
            assert wd >= 0, path
            self.wds[wd] = path
        self.reads: dict[Path, int] = dict.fromkeys([*paths, *accessed], 0)

    def wait_all_read(self, timeout: float, times: int = 1) -> None:
        """Waits until each file was read and closed ``times`` times."""

        def done() -> bool:
            select.select([self.fd], [], [], 0.2)
            with contextlib.suppress(BlockingIOError):
                data = os.read(self.fd, 65536)
                pos = 0
                while pos < len(data):
                    wd, _mask, _cookie, size = struct.unpack_from("iIII", data, pos)
                    self.reads[self.wds[wd]] += 1
                    pos += 16 + size
            return min(self.reads.values()) >= times

        wait_for(done, timeout, f"every one of {sorted(map(str, self.wds.values()))} read")

    def close(self) -> None:
        os.close(self.fd)


def start(backend: Backend, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [NBANKCTL, *backend.before, *argv],
        env=dict(backend.env, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


def two_copies(backend: Backend, label: str) -> tuple[str, Archive, str, Archive, str, bytes]:
    """A resource stored and registered in two local archives A and B (each copy the
    other's verified second copy): its id, A and its name, B and its name, its bytes."""
    a, a_name = backend.archive("a")
    b, b_name = backend.archive("b")
    data = backend.blob(label) * 1000
    id = backend.resource(data, a_name)
    backend.registry.add_location(id, b_name)
    store(a, id, data)
    store(b, id, data)
    return id, a, a_name, b, b_name, data


def copies_left(id: str, *archives: Archive) -> list[Path]:
    return [p for a in archives if (p := a.stored_path(id)) is not None]


# --- tape prune against tape prune ------------------------------------------------------


def test_prunes_of_two_archives_at_once_keep_one_copy(embedded: Backend) -> None:
    """Two prunes of the same resource, one in each of its two archives, run at once
    (two people freeing space): each copy is the other's second copy, so one must stay."""
    id, a, a_name, b, b_name, data = two_copies(embedded, "crossed")
    listing = embedded.tmp / "ids.txt"
    listing.write_text(id + "\n")
    watch = ReadWatch([a.stored_path(id), b.stored_path(id)])  # type: ignore[list-item]
    try:
        with registry_write_lock(embedded):
            procs = [start(embedded, "tape", "prune", n, str(listing)) for n in (a_name, b_name)]
            watch.wait_all_read(60)  # each has hashed the other's copy: verified
        results = [finish(p) for p in procs]
    finally:
        watch.close()
    left = copies_left(id, a, b)
    assert len(left) >= 1, results
    assert all(p.read_bytes() == data for p in left)
    names = {loc.archive_name for loc in embedded.registry.get_locations(id)}
    assert names == {arch for arch, x in ((a_name, a), (b_name, b)) if x.stored_path(id)}


def test_the_same_prune_run_twice_at_once_deletes_once_and_neither_fails(
    embedded: Backend,
) -> None:
    """The same ``tape prune`` run twice at once (cron and a person): the copy goes once,
    the second copy and its location stay, and neither run fails or claims a copy kept."""
    id, a, a_name, b, b_name, data = two_copies(embedded, "twice")
    other = embedded.name("o")
    odata = embedded.blob("other") * 1000
    embedded.resource(odata, a_name, name=other)
    embedded.registry.add_location(other, b_name)
    store(a, other, odata)
    store(b, other, odata)
    listing = embedded.tmp / "ids.txt"
    listing.write_text(f"{id}\n{other}\n")
    watch = ReadWatch([b.stored_path(id)])  # type: ignore[list-item]
    try:
        with registry_write_lock(embedded):
            # one run at a time up to its read of B's copy: inotify merges two like
            # events still unread into one, so two reads at once could count as one
            procs = []
            for n in (1, 2):
                procs.append(start(embedded, "tape", "prune", a_name, str(listing)))
                watch.wait_all_read(60, times=n)  # this run has verified B's copy too
        results = [finish(p) for p in procs]
    finally:
        watch.close()
    assert copies_left(id, a, b) == [b.stored_path(id)]
    assert b.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    assert copies_left(other, a, b) == [b.stored_path(other)]
    for x in (id, other):
        assert {loc.archive_name for loc in embedded.registry.get_locations(x)} == {b_name}
    for code, _out, err in results:
        assert "kept" not in err.replace("kept: 0", ""), err
        assert "Traceback" not in err
        assert code == 0, err


# --- nbankctl deposit against nbankctl deposit ------------------------------------------


def paused(tmp: Path, label: str, point: str) -> tuple[dict[str, str], Path]:
    """The environment that holds a run at ``point`` until the returned path exists."""
    until = tmp / f"go-{label}"
    return {"NBANKD_PAUSE_AT": point, "NBANKD_PAUSE_UNTIL": str(until)}, until


def reached(until: Path) -> bool:
    return Path(f"{until}.reached").exists()


def deposit(
    backend: Backend,
    archive: Archive,
    *paths: Path,
    env: dict[str, str] | None = None,
    wait: str | None = None,
) -> subprocess.Popen[str]:
    """``nbankctl deposit ARCHIVE -d DTYPE -j PATHS`` (``--wait`` seconds if given)."""
    extra = ["--wait", wait] if wait is not None else []
    argv = ["deposit", str(archive.path), "-d", backend.dtype, "-j", *extra]
    return start(backend, *argv, *map(str, paths), env=env)


def alice_then_bob(
    backend: Backend, archive: Archive, sources: list[Path], wait: str | None = None
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """Alice deposits ``sources[0]`` and Bob ``sources[-1]``, each with a journal of
    their own; both are held once journaled, then Alice's run finishes before Bob's
    goes on. Returns (code, stdout, stderr) of each."""
    procs, gates = [], []
    for who, src in zip(("alice", "bob"), (sources[0], sources[-1]), strict=True):
        env, until = paused(backend.tmp, who, "after-journal-add")
        env["XDG_STATE_HOME"] = str(backend.tmp / who)
        procs.append(deposit(backend, archive, src, env=env, wait=wait))
        gates.append(until)
    wait_for(lambda: all(map(reached, gates)), 60, "both deposits journaled")
    gates[0].touch()
    first = finish(procs[0])
    gates[1].touch()
    return first, finish(procs[1])


@pytest.fixture
def django(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The django-neurobank registry (no configuration: each user's own journal);
    every name and content is unique to the test."""
    b = make_backend("django", tmp_path, request)
    yield b
    b.registry.close()


def test_two_users_depositing_one_file_at_once_store_it_once(django: Backend) -> None:
    """Two users (two journals in their own $XDG_STATE_HOME) deposit the very same file
    at once, both past their intent: it is stored and registered once, and the loser
    exits 1 naming the file without telling that it is still there to deposit again
    (the search that finds it stored instead)."""
    archive, _ = django.archive()
    folder = django.tmp / "rig"
    folder.mkdir()
    data = django.blob("shared") * 100
    src = folder / f"{django.name('u')}.dat"
    src.write_bytes(data)
    first, second = alice_then_bob(django, archive, [src])
    assert first[0] == 0, first
    stored = archive.stored_path(src.stem)
    assert stored is not None and stored.read_bytes() == data
    assert django.registry.get_resource(src.stem) is not None
    assert [p for p in archive.resources_dir.rglob("*") if p.is_file()] == [stored]
    code, out, err = second
    assert code == 1, second
    assert str(src) in err and f'"id": "{src.stem}"' not in out, second
    assert "still there" not in err and "work folder" not in err, err
    assert f"nbankctl search {src.stem}" in err, err  # where it went: ask the registry
    assert not (folder / ".nbank").exists() and not (folder / "nbank-rejected").exists()


def test_two_users_depositing_two_files_of_one_folder_at_once_deposit_both(
    django: Backend,
) -> None:
    """Two users deposit two different files of one rig folder at once (each its own
    journal): the first to finish tidies up, and still both files are deposited."""
    archive, _ = django.archive()
    folder = django.tmp / "rig"
    folder.mkdir()
    files = {}
    for who in ("alice", "bob"):
        src = folder / f"{django.name(who[0])}.dat"
        src.write_bytes(django.blob(who) * 100)
        files[who] = src
    first, second = alice_then_bob(django, archive, [files["alice"], files["bob"]], wait="1")
    assert first[0] == 0, first
    assert second[0] == 0, second
    for who, src in files.items():
        stored = archive.stored_path(src.stem)
        assert stored is not None and stored.read_bytes() == django.blob(who) * 100


# --- tape prune against copy and deposit ------------------------------------------------


def test_copy_reading_a_copy_that_prune_deletes_stores_the_whole_resource(
    embedded: Backend,
) -> None:
    """``copy -a A`` reads a resource out of A while ``tape prune A`` deletes it (its
    second copy in B): the new copy in C has the registered bytes and is located, and
    B's copy and location stay."""
    id, a, a_name, b, b_name, data = two_copies(embedded, "copied")
    c, c_name = embedded.archive("c")
    listing = embedded.tmp / "ids.txt"
    listing.write_text(id + "\n")
    watch = ReadWatch([a.stored_path(id), b.stored_path(id)])  # type: ignore[list-item]
    try:
        with registry_write_lock(embedded):
            prune = start(embedded, "tape", "prune", a_name, str(listing))
            copy = start(embedded, "copy", "-a", a_name, str(c.path), id)
            watch.wait_all_read(60)  # prune verified B's copy; copy read A's
        pruned, copied = finish(prune), finish(copy)
    finally:
        watch.close()
    assert pruned[0] == 0 and copied[0] == 0, (pruned, copied)
    assert a.stored_path(id) is None
    for archive in (b, c):
        stored = archive.stored_path(id)
        assert stored is not None and stored.read_bytes() == data
    names = {loc.archive_name for loc in embedded.registry.get_locations(id)}
    assert names == {b_name, c_name}


def test_deposit_publishing_into_a_stub_folder_prune_empties_is_stored_once(
    embedded: Backend,
) -> None:
    """A deposit registered and about to publish into ``resources/ab/`` while ``tape
    prune`` deletes that folder's only resource and the emptied folder: the deposit is
    stored once with its bytes, and the pruned resource keeps its second copy."""
    a, a_name = embedded.archive("a")
    b, b_name = embedded.archive("b")
    old = "zq" + embedded.name("old")
    odata = embedded.blob("old") * 100
    embedded.resource(odata, a_name, name=old)
    embedded.registry.add_location(old, b_name)
    store(a, old, odata)
    store(b, old, odata)
    folder = embedded.tmp / "rig"
    folder.mkdir()
    src = folder / f"zq{embedded.name('new')}.dat"
    new = embedded.blob("new") * 100
    src.write_bytes(new)
    env, until = paused(embedded.tmp, "dep", "after-register")
    dep = deposit(embedded, a, src, env=env)
    wait_for(lambda: reached(until), 60, "the deposit registered")
    listing = embedded.tmp / "ids.txt"
    listing.write_text(old + "\n")
    pruned = embedded.ctl("tape", "prune", a_name, str(listing))
    assert pruned.returncode == 0, pruned.stderr
    assert not (a.resources_dir / "zq").exists()  # the emptied stub folder went
    until.touch()
    code, _out, err = finish(dep)
    assert code == 0, err
    stored = a.stored_path(src.stem)
    assert stored is not None and stored.read_bytes() == new
    assert [p for p in a.resources_dir.rglob("*") if p.is_file()] == [stored]
    assert not src.exists() and embedded.registry.get_resource(src.stem) is not None
    assert b.stored_path(old) is not None and a.stored_path(old) is None


# --- copy against tape import -------------------------------------------------------------


def test_copy_and_tape_import_of_one_resource_into_one_archive_store_it_once(
    embedded: Backend,
) -> None:
    """``copy`` and ``tape import`` bring the same resource into archive C at once: both
    succeed, C holds one file with the registered bytes, located once, staging empty."""
    a, a_name = embedded.archive("a")
    c, c_name = embedded.archive("c")
    tape = embedded.name("tp")
    embedded.registry.add_archive(tape, "tape", f"{tape}:1", "offline")
    data = embedded.blob("both") * 1000
    id = embedded.resource(data, a_name)
    embedded.registry.add_location(id, tape, key=f"resources/{id[:2]}/{id}.dat")
    store(a, id, data)
    tar = make_tar(embedded.tmp / "t.tar", [(f"resources/{id[:2]}/{id}.dat", data)])
    # the tar stays open while import reads it: a read of it is what can be seen
    watch = ReadWatch([a.stored_path(id)], accessed=(tar,))  # type: ignore[list-item]
    try:
        with registry_write_lock(embedded):
            imp = start(embedded, "tape", "import", str(tar), str(c.path), id)
            copy = start(embedded, "copy", "-a", a_name, str(c.path), id)
            watch.wait_all_read(60)  # each has read its source
        imported, copied = finish(imp), finish(copy)
    finally:
        watch.close()
    assert imported[0] == 0 and copied[0] == 0, (imported, copied)
    [stored] = [p for p in c.resources_dir.rglob("*") if p.is_file()]
    assert stored.read_bytes() == data and stored == c.stored_path(id)
    names = [loc.archive_name for loc in embedded.registry.get_locations(id)]
    assert names.count(c_name) == 1
    assert os.listdir(c.staging_dir) == []
