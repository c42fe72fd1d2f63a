"""Staging, publishing and verifying resources (run as root; see the unprivileged tests too)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from archive_helpers import make_tree, resource_entries, staged_entries
from nbank.util import hash_directory as nbank_hash_directory

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.fsops import rename_noreplace
from nbankd.archive.layout import Archive
from nbankd.hashing import SourceReadError, sha1_file


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def stage_and_publish(archive: Archive, src: Path, id: str, token: str = "t1") -> durable.Published:
    staged = durable.stage_copy(archive, src, f".nbankd-{token}")
    return durable.publish(archive, staged.path, archive.new_resource_path(id, src.name))


# --- staging -----------------------------------------------------------------------------


def test_stage_copy_hashes_and_copies(archive: Archive, src_file: Path) -> None:
    """stage_copy puts an identical copy in staging/ and returns its sha1 and size."""
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    assert staged.path == archive.staging_dir / ".nbankd-a"
    assert staged.path.read_bytes() == src_file.read_bytes()
    assert staged.sha1 == sha1_file(src_file)
    assert staged.size == src_file.stat().st_size


def test_stage_copy_from_open_descriptor(archive: Archive, src_file: Path) -> None:
    """An open descriptor is copied from its current offset."""
    fd = os.open(src_file, os.O_RDONLY)
    try:
        staged = durable.stage_copy(archive, fd, ".nbankd-fd")
    finally:
        os.close(fd)
    assert staged.sha1 == sha1_file(src_file)


def test_stage_copy_replaces_leftover_of_same_name(archive: Archive, src_file: Path) -> None:
    """A staged file left by a crashed attempt is replaced, not appended to."""
    (archive.staging_dir / ".nbankd-a").write_bytes(b"stale partial data")
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    assert staged.path.read_bytes() == src_file.read_bytes()


def test_stage_copy_rejects_foreign_names(archive: Archive, src_file: Path) -> None:
    """Names without the .nbankd- prefix (e.g. nbank's own zips) are refused."""
    with pytest.raises(ValueError, match="nbankd-"):
        durable.stage_copy(archive, src_file, "rec01.zip")


def test_stage_copy_refuses_symlink_source(archive: Archive, src_file: Path) -> None:
    """A symbolic link given as the source path is never followed."""
    link = src_file.with_name("link.wav")
    link.symlink_to(src_file)
    with pytest.raises(errors.NbankdError, match="symbolic link"):
        durable.stage_copy(archive, link, ".nbankd-l")
    assert staged_entries(archive) == []


def test_stage_copy_refuses_hard_linked_source(archive: Archive, src_file: Path) -> None:
    """A source with two names (nlink > 1) is refused."""
    os.link(src_file, src_file.with_name("other.wav"))
    with pytest.raises(errors.NbankdError, match="hard link"):
        durable.stage_copy(archive, src_file, ".nbankd-h")


def test_unreadable_source_leaves_nothing(archive: Archive, src_file: Path) -> None:
    """A source that fails mid-copy (closed) raises SourceReadError and cleans staging."""
    src = open(src_file, "rb")  # noqa: SIM115
    src.close()
    with pytest.raises(SourceReadError):
        durable.stage_copy(archive, src, ".nbankd-x")
    assert staged_entries(archive) == []
    assert resource_entries(archive) == []


def test_missing_config_is_unavailable(archive: Archive, src_file: Path) -> None:
    """Without nbank.json (unmounted filesystem) staging raises ArchiveUnavailable."""
    archive.config_path.unlink()
    with pytest.raises(errors.ArchiveUnavailable, match="mounted"):
        durable.stage_copy(archive, src_file, ".nbankd-a")
    assert staged_entries(archive) == []


def test_stage_copy_tree_matches_neurobank_hash(archive: Archive, tmp_path: Path) -> None:
    """A staged tree is an identical copy with neurobank's directory hash."""
    src = make_tree(tmp_path / "tree")
    staged = durable.stage_copy_tree(archive, src, ".nbankd-t")
    assert staged.sha1 == nbank_hash_directory(src)
    assert nbank_hash_directory(staged.path) == staged.sha1
    assert (staged.path / "empty" / "nested").is_dir()
    assert staged.size == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "socket"])
def test_stage_copy_tree_refuses_special_entries(
    archive: Archive, tmp_path: Path, kind: str
) -> None:
    """Links, FIFOs and sockets inside a tree are refused by name and leave no copy."""
    src = make_tree(tmp_path / "tree")
    bad = src / "a" / "c" / "bad"
    if kind == "symlink":
        bad.symlink_to(src / "a.b")
    elif kind == "hardlink":
        os.link(src / "a.b", bad)
    elif kind == "fifo":
        os.mkfifo(bad)
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(bad))
        sock.close()
    with pytest.raises(errors.NbankdError) as info:
        durable.stage_copy_tree(archive, src, ".nbankd-t")
    assert "/a/c/bad" in str(info.value) or "/a.b" in str(info.value)
    assert staged_entries(archive) == []


def test_stage_copy_tree_needs_allow_directories(tmp_path: Path) -> None:
    """An archive that does not allow directories refuses a tree."""
    from nbankd.archive.opening import create_archive

    archive = create_archive(tmp_path / "nodirs", "http://127.0.0.1:1/neurobank/")
    with pytest.raises(errors.DirectoryNotAllowed):
        durable.stage_copy_tree(archive, make_tree(tmp_path / "tree"), ".nbankd-t")


# --- publishing --------------------------------------------------------------------------


def test_publish_places_read_only_file(archive: Archive, src_file: Path) -> None:
    """The published file has the stored bytes, mode 0444, a 2775 stub, and staging is empty."""
    published = stage_and_publish(archive, src_file, "abcd1234")
    assert published.created
    assert published.path == archive.resources_dir / "ab" / "abcd1234.wav"
    assert published.path.read_bytes() == src_file.read_bytes()
    assert mode(published.path) == 0o444
    assert mode(published.path.parent) == 0o2775
    assert os.lstat(published.path).st_nlink == 1
    assert staged_entries(archive) == []


def test_publish_twice_is_idempotent(archive: Archive, src_file: Path) -> None:
    """Publishing identical contents again reports created=False and cleans staging."""
    first = stage_and_publish(archive, src_file, "abcd1234", "t1")
    again = stage_and_publish(archive, src_file, "abcd1234", "t2")
    assert (first.created, again.created) == (True, False)
    assert staged_entries(archive) == []


def test_publish_rerun_after_staged_copy_gone(archive: Archive, src_file: Path) -> None:
    """A re-run whose staged file is already gone succeeds when the target has its sha1."""
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    target = archive.new_resource_path("abcd1234", src_file.name)
    durable.publish(archive, staged.path, target)
    rerun = durable.publish(archive, staged.path, target, sha1=staged.sha1)
    assert rerun == durable.Published(target, created=False)


def test_publish_rerun_after_link_before_unlink(archive: Archive, src_file: Path) -> None:
    """A crash between link and unlink (both names present) re-runs to created=False."""
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    target = archive.new_resource_path("abcd1234", src_file.name)
    target.parent.mkdir()
    os.link(staged.path, target)
    assert durable.publish(archive, staged.path, target).created is False
    assert staged_entries(archive) == []


def test_publish_refuses_different_existing_file(
    archive: Archive, src_file: Path, tmp_path: Path
) -> None:
    """A different file at the target raises ResourceExists naming both and stays untouched."""
    target = archive.new_resource_path("abcd1234", src_file.name)
    target.parent.mkdir()
    target.write_bytes(b"somebody else's recording")
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    with pytest.raises(errors.ResourceExists) as info:
        durable.publish(archive, staged.path, target)
    assert str(target) in str(info.value) and str(staged.path) in str(info.value)
    assert target.read_bytes() == b"somebody else's recording"
    assert staged_entries(archive) == []


def test_publish_refuses_same_size_different_bytes(archive: Archive, tmp_path: Path) -> None:
    """Equal sizes are not enough: contents are compared by hash."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 99 + b"y")
    stage_and_publish(archive, a, "same1", "t1")
    with pytest.raises(errors.ResourceExists):
        stage_and_publish(archive, b, "same1", "t2")
    assert archive.resource_path("same1", "bin").read_bytes() == b"x" * 100


def test_publish_directory_sets_modes(archive: Archive, tmp_path: Path) -> None:
    """A published tree has 0555 folders, 0444 files and neurobank's hash."""
    src = make_tree(tmp_path / "tree")
    staged = durable.stage_copy_tree(archive, src, ".nbankd-t")
    published = durable.publish(archive, staged.path, archive.resource_path("dir001"))
    assert published.created
    assert nbank_hash_directory(published.path) == staged.sha1
    assert mode(published.path) == 0o555
    assert mode(published.path / "a" / "c") == 0o555
    assert mode(published.path / "a" / "c" / "d.txt") == 0o444
    assert staged_entries(archive) == []


def test_publish_directory_never_replaces_empty_directory(archive: Archive, tmp_path: Path) -> None:
    """An existing empty folder at the target is kept and ResourceExists raised."""
    target = archive.resource_path("dir001")
    target.mkdir(parents=True)
    staged = durable.stage_copy_tree(archive, make_tree(tmp_path / "tree"), ".nbankd-t")
    with pytest.raises(errors.ResourceExists):
        durable.publish(archive, staged.path, target)
    assert target.is_dir() and os.listdir(target) == []


def test_publish_directory_twice_is_idempotent(archive: Archive, tmp_path: Path) -> None:
    """Publishing an identical tree again reports created=False."""
    src = make_tree(tmp_path / "tree")
    target = archive.resource_path("dir001")
    first = durable.publish(
        archive, durable.stage_copy_tree(archive, src, ".nbankd-1").path, target
    )
    again = durable.publish(
        archive, durable.stage_copy_tree(archive, src, ".nbankd-2").path, target
    )
    assert (first.created, again.created) == (True, False)
    assert staged_entries(archive) == []


def test_rename_noreplace_refuses_empty_directory(tmp_path: Path) -> None:
    """renameat2(RENAME_NOREPLACE) fails on an existing empty folder, unlike rename(2)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "src").is_dir()


def test_fallback_placement_never_replaces_empty_directory(tmp_path: Path) -> None:
    """Without RENAME_NOREPLACE, an existing empty folder (not our reservation) is kept."""
    from nbankd.archive.durable import _place_directory

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    dst.mkdir()
    assert _place_directory(src, dst, noreplace=False) is False
    assert os.listdir(dst) == [] and src.is_dir()


def test_fallback_placement_reuses_its_own_reservation(tmp_path: Path) -> None:
    """A reservation left by a crash (empty, mode 1700, ours) is replaced by the tree."""
    from nbankd.archive.durable import RESERVATION_MODE, _place_directory

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    dst.mkdir()
    dst.chmod(RESERVATION_MODE)
    assert _place_directory(src, dst, noreplace=False) is True
    assert (dst / "a" / "b").read_bytes() == b"one" and not src.exists()


def test_publish_in_place_moves_file(archive: Archive, src_file: Path) -> None:
    """publish_in_place links the source into place, applies the policy and removes it."""
    data = src_file.read_bytes()
    target = archive.new_resource_path("inpl01", src_file.name)
    published = durable.publish_in_place(archive, src_file, target)
    assert published.created and not src_file.exists()
    assert target.read_bytes() == data and mode(target) == 0o444


def test_publish_in_place_keeps_source_on_conflict(archive: Archive, src_file: Path) -> None:
    """On ResourceExists the in-place source stays where it is."""
    target = archive.new_resource_path("inpl01", src_file.name)
    target.parent.mkdir()
    target.write_bytes(b"other")
    with pytest.raises(errors.ResourceExists):
        durable.publish_in_place(archive, src_file, target)
    assert src_file.exists() and target.read_bytes() == b"other"


def test_publish_in_place_refuses_hard_link(archive: Archive, src_file: Path) -> None:
    """A source with another name (nlink 2) is refused and nothing is published."""
    os.link(src_file, src_file.with_name("twin.wav"))
    with pytest.raises(errors.NbankdError, match="hard link"):
        durable.publish_in_place(archive, src_file, archive.new_resource_path("inpl01", "x.wav"))
    assert resource_entries(archive) == []


def test_publish_in_place_directory(archive: Archive, tmp_path: Path) -> None:
    """A folder on the archive's filesystem is renamed into place with the policy's modes."""
    src = make_tree(tmp_path / "work" / "tree")
    expected = nbank_hash_directory(src)
    published = durable.publish_in_place(archive, src, archive.resource_path("dir002"))
    assert not src.exists() and nbank_hash_directory(published.path) == expected
    assert mode(published.path) == 0o555
    inside = {p: mode(p) for p in published.path.rglob("*")}
    assert inside and all(m == (0o555 if p.is_dir() else 0o444) for p, m in inside.items())


def test_nothing_of_ours_under_resources(archive: Archive, src_file: Path, tmp_path: Path) -> None:
    """After file and tree publishes, resources/ holds only the resources and stubs."""
    stage_and_publish(archive, src_file, "abcd1234")
    staged = durable.stage_copy_tree(archive, make_tree(tmp_path / "tree"), ".nbankd-t")
    durable.publish(archive, staged.path, archive.resource_path("abdir"))
    top = sorted(os.listdir(archive.resources_dir / "ab"))
    assert top == ["abcd1234.wav", "abdir"]


# --- verification ------------------------------------------------------------------------


def test_verify_from_storage_accepts_intact_file(archive: Archive, src_file: Path) -> None:
    """An intact stored file verifies."""
    published = stage_and_publish(archive, src_file, "abcd1234")
    assert durable.verify_from_storage(published.path, sha1_file(src_file))


def test_verify_from_storage_detects_flipped_byte(archive: Archive, src_file: Path) -> None:
    """One flipped byte in the stored file fails verification."""
    published = stage_and_publish(archive, src_file, "abcd1234")
    sha1 = sha1_file(src_file)
    with open(published.path, "r+b") as fp:  # root may write a 0444 file
        fp.seek(1 << 20)
        byte = fp.read(1)
        fp.seek(1 << 20)
        fp.write(bytes([byte[0] ^ 0x01]))
    assert not durable.verify_from_storage(published.path, sha1)


def test_verify_from_storage_of_tree(archive: Archive, tmp_path: Path) -> None:
    """A stored tree verifies against neurobank's directory hash and fails when changed."""
    staged = durable.stage_copy_tree(archive, make_tree(tmp_path / "tree"), ".nbankd-t")
    published = durable.publish(archive, staged.path, archive.resource_path("dir001"))
    assert durable.verify_from_storage(published.path, staged.sha1)
    (published.path / "a" / "b").write_bytes(b"two")
    assert not durable.verify_from_storage(published.path, staged.sha1)


def test_verify_from_storage_missing_is_false(archive: Archive) -> None:
    """A missing stored file does not verify."""
    assert not durable.verify_from_storage(archive.resource_path("nothere"), "0" * 40)


def test_list_and_discard_staged(archive: Archive, src_file: Path, tmp_path: Path) -> None:
    """Leftovers of ours are listed (not nbank's) and discarded, trees included."""
    durable.stage_copy(archive, src_file, ".nbankd-a")
    durable.stage_copy_tree(archive, make_tree(tmp_path / "tree"), ".nbankd-b")
    (archive.staging_dir / "theirs.zip").write_bytes(b"nbank")
    leftovers = durable.list_staged(archive)
    assert [p.name for p in leftovers] == [".nbankd-a", ".nbankd-b"]
    for p in leftovers:
        durable.discard_staged(archive, p)
    assert staged_entries(archive) == ["theirs.zip"]


def test_publish_refuses_same_id_with_other_extension(archive: Archive, src_file: Path) -> None:
    """A resource already stored under another extension blocks the publish (no duplicate)."""
    other = archive.resource_path("abcd1234", "pprox")
    other.parent.mkdir()
    other.write_bytes(b"first")
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    with pytest.raises(errors.ResourceExists, match=r"abcd1234\.pprox"):
        durable.publish(archive, staged.path, archive.new_resource_path("abcd1234", "x.wav"))
    assert os.listdir(other.parent) == ["abcd1234.pprox"]


def test_publish_refuses_one_character_identifier_in_the_other_stub(
    archive: Archive, src_file: Path
) -> None:
    """``a.dat`` filed by nbank 0.13 in ``resources/a./`` holds identifier ``a``:
    publishing ``a.wav`` into ``resources/a/`` is refused, naming that file."""
    legacy = archive.resources_dir / "a." / "a.dat"
    legacy.parent.mkdir()
    legacy.write_bytes(b"first")
    staged = durable.stage_copy(archive, src_file, ".nbankd-a")
    with pytest.raises(errors.StoredUnderOtherName) as caught:
        durable.publish(archive, staged.path, archive.stored_file("a", "a.wav"), id="a")
    assert caught.value.stored == str(legacy)
    assert not (archive.resources_dir / "a").exists() or not os.listdir(archive.resources_dir / "a")


def test_publish_one_identifier_from_two_threads_files_one(
    archive: Archive, tmp_path: Path
) -> None:
    """Two threads publishing one identifier under two stored names at once: exactly
    one is filed, the other refused naming it."""
    import threading

    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def publish(ext: str) -> None:
        src = tmp_path / f"src{ext}"
        src.write_bytes(b"same bytes")
        staged = durable.stage_copy(archive, src, f".nbankd-{ext[1:]}")
        barrier.wait()
        try:
            results[ext] = durable.publish(
                archive, staged.path, archive.stored_file("bb", f"bb{ext}"), id="bb"
            )
        except errors.StoredUnderOtherName as err:
            results[ext] = err

    for _ in range(20):
        for p in archive.resources_dir.glob("bb/*"):
            p.unlink()
        results.clear()
        threads = [threading.Thread(target=publish, args=(e,)) for e in (".wav", ".bin")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [e for e, r in results.items() if isinstance(r, errors.StoredUnderOtherName)]
        assert len(refused) == 1, results
        assert len(os.listdir(archive.resources_dir / "bb")) == 1


def test_publish_waits_for_another_process_holding_the_identifier(
    archive: Archive, tmp_path: Path
) -> None:
    """Another process holding the stub folder's lock (as a second daemon publishing
    the same identifier does) keeps this publish waiting; the file it filed
    meanwhile is then found, and nothing is filed twice."""
    import subprocess
    import sys
    import threading

    stub = archive.resources_dir / "cc"
    stub.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(stub)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    src = tmp_path / "src.wav"
    src.write_bytes(b"same bytes")
    staged = durable.stage_copy(archive, src, ".nbankd-cc")
    result: list[object] = []

    def publish() -> None:
        try:
            result.append(durable.publish(archive, staged.path, stub / "cc.wav", id="cc"))
        except errors.StoredUnderOtherName as err:
            result.append(err)

    thread = threading.Thread(target=publish)
    thread.start()

    def waiting() -> bool:
        with open("/proc/locks") as f:
            return any("->" in line and "FLOCK" in line for line in f)

    from fixtures.daemon import wait_for

    wait_for(waiting, 30, "the publish to wait for the lock")
    (stub / "cc.bin").write_bytes(b"same bytes")  # the other process's file
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait()
    thread.join()
    assert isinstance(result[0], errors.StoredUnderOtherName)
    assert sorted(os.listdir(stub)) == ["cc.bin"]


def test_hash_tree_equals_the_staged_copys_hash_and_copies_nothing(
    archive: Archive, tmp_path: Path
) -> None:
    """hash_tree gives the hash and size stage_copy_tree gives, and writes nothing."""
    src = tmp_path / "tree"
    make_tree(src)
    before = sorted(os.listdir(archive.staging_dir))
    sha1, size = durable.hash_tree(archive, src)
    assert sorted(os.listdir(archive.staging_dir)) == before
    staged = durable.stage_copy_tree(archive, src, ".nbankd-tree")
    assert (sha1, size) == (staged.sha1, staged.size)


def test_hash_tree_refuses_a_link_inside(archive: Archive, tmp_path: Path) -> None:
    """A symbolic link inside the tree is refused by hash_tree, as by the copy."""
    src = tmp_path / "tree"
    make_tree(src)
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(errors.UnsafeInput):
        durable.hash_tree(archive, src)
