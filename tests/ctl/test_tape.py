"""nbankctl tape register | prune | import, on real tar files, against both registry backends."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from nbank.util import hash_directory

from fixtures.cli_backends import Backend, make_tar, sha1, store
from nbankd.archive.layout import Archive
from nbankd.registry.base import LocationRecord


def folder(backend: Backend, label: str) -> dict[str, bytes]:
    """The files of a folder resource (relative path -> contents), unique to this test."""
    return {
        "a.txt": backend.blob(f"{label}-a"),
        "sub/b.bin": backend.blob(f"{label}-b"),
        "sub/deeper/c": backend.blob(f"{label}-c"),
    }


def folder_sha1(backend: Backend, files: dict[str, bytes]) -> str:
    """neurobank's own directory hash (nbank.util.hash_directory) of these files on disk."""
    root = backend.tmp / f"folder-{backend.name()}"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty").mkdir()
    return hash_directory(root)


def folder_members(top: str, files: dict[str, bytes]) -> list[tuple[str, bytes | None]]:
    """A folder resource as tar members: the folder, its subfolders, then its files."""
    dirs = sorted({str(Path(rel).parent) for rel in files} - {"."} | {"empty"})
    return [(top, None), *((f"{top}/{d}", None) for d in dirs)] + [
        (f"{top}/{rel}", data) for rel, data in files.items()
    ]


def member(id: str, ext: str = ".dat") -> str:
    """A member path inside a tar (nbank export writes `<id><ext>` at the top; import
    looks only at the base name)."""
    return f"resources/{id[:2]}/{id}{ext}"


def tape_locations(backend: Backend, id: str) -> list[LocationRecord]:
    return [loc for loc in backend.registry.get_locations(id) if loc.scheme == "tape"]


def tree(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int, int]]:
    """Every path under root (links not followed) with (mode, size, mtime_ns)."""
    out: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p in skip:
                continue
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def tape_archive(backend: Backend) -> str:
    """Registers a tape archive (as a previous tape register would) and returns its name."""
    name = backend.name("tp")
    backend.registry.add_archive(name, "tape", f"{name}:1", "offline")
    return name


# --- register ----------------------------------------------------------------------------


def test_register_adds_tape_locations_keyed_by_member(backend: Backend) -> None:
    """tape register creates TAPE-N (scheme tape, root TAPE:N) and locates each resource."""
    _, arch = backend.archive()
    a, b = backend.blob("a"), backend.blob("b")
    ida, idb = backend.resource(a, arch), backend.resource(b, arch)
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a), (member(idb), b), ("x.txt", b"x")])
    tape = backend.name("TAPE")
    proc = backend.ctl("tape", "register", tape, "3", str(tar))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    archive = backend.registry.get_archive(f"{tape}-3")
    assert archive is not None and (archive.scheme, archive.root) == ("tape", f"{tape}:3")
    assert archive.accessibility == "offline"
    for id in (ida, idb):
        assert tape_locations(backend, id) == [
            LocationRecord(f"{tape}-3", "tape", f"{tape}:3", id, member(id))
        ]
    assert "x.txt -> no match in registry" in proc.stderr
    if backend.url is not None:
        assert f"tape://{tape}:3/{ida}" in backend.nbank("locate", ida).stdout


def test_register_twice_resumes(backend: Backend) -> None:
    """A second tape register on the same tape file resumes: no error, no duplicate location."""
    _, arch = backend.archive()
    a, b = backend.blob("a"), backend.blob("b")
    ida = backend.resource(a, arch)
    idb_name = backend.name()
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a), (member(idb_name), b)])
    tape = backend.name("TAPE")
    assert backend.ctl("tape", "register", tape, "0", str(tar)).returncode == 0
    idb = backend.resource(b, arch, name=idb_name)  # registered after the first run
    proc = backend.ctl("tape", "register", tape, "0", str(tar))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming archive '{tape}-0'" in proc.stderr
    assert f"{member(ida)} -> already registered" in proc.stderr
    assert f"{member(idb)} -> added location" in proc.stderr
    assert len(tape_locations(backend, ida)) == 1 and len(tape_locations(backend, idb)) == 1


def test_register_after_nbank_register_tar_records_member_names(django_backend: Backend) -> None:
    """tape register resumes a tape registered by nbank's register-tar and keys its locations."""
    backend = django_backend
    _, arch = backend.archive()
    a = backend.blob("a")
    ida = backend.resource(a, arch)
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a)])
    tape = backend.name("TAPE")
    theirs = backend.nbank("archive", "register-tar", tape, "2", str(tar))
    assert theirs.returncode == 0, theirs.stderr
    assert [loc.key for loc in tape_locations(backend, ida)] == [None]
    proc = backend.ctl("tape", "register", tape, "2", str(tar))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{member(ida)} -> recorded the member name" in proc.stderr
    assert [loc.key for loc in tape_locations(backend, ida)] == [member(ida)]


def test_register_dry_run_changes_nothing(backend: Backend) -> None:
    """tape register --dry-run creates no archive and adds no location."""
    _, arch = backend.archive()
    a = backend.blob("a")
    ida = backend.resource(a, arch)
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a)])
    tape = backend.name("TAPE")
    proc = backend.ctl("tape", "register", "--dry-run", tape, "1", str(tar))
    assert proc.returncode == 0, proc.stderr
    assert "would add location" in proc.stderr
    assert backend.registry.get_archive(f"{tape}-1") is None
    assert tape_locations(backend, ida) == []


def test_register_refuses_name_of_another_archive(backend: Backend) -> None:
    """tape register -n NAME fails, naming it, when NAME is a different archive."""
    _, arch = backend.archive()
    tar = make_tar(backend.tmp / "t.tar", [("x.txt", b"x")])
    proc = backend.ctl("tape", "register", "-n", arch, backend.name("TAPE"), "1", str(tar))
    assert proc.returncode == 1 and arch in proc.stderr and "-n NAME" in proc.stderr


def test_register_refuses_member_whose_sha1_differs(backend: Backend) -> None:
    """A member whose bytes differ from the registered SHA-1 gets no location; exit 1."""
    _, arch = backend.archive()
    good, bad = backend.blob("good"), backend.blob("bad")
    idg, idb = backend.resource(good, arch), backend.resource(bad, arch)
    tar = make_tar(backend.tmp / "t.tar", [(member(idg), good), (member(idb), b"flipped")])
    tape = backend.name("TAPE")
    proc = backend.ctl("tape", "register", tape, "4", str(tar))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"✗ {member(idb)} -> SHA-1 {sha1(b'flipped')} of member {member(idb)!r}" in proc.stderr
    assert f"the registered {sha1(bad)} of resource '{idb}'" in proc.stderr
    assert tape_locations(backend, idb) == []
    assert [loc.key for loc in tape_locations(backend, idg)] == [member(idg)]


def test_register_dry_run_reports_mismatch(backend: Backend) -> None:
    """tape register --dry-run hashes too: a mismatching member is reported and exits 1."""
    _, arch = backend.archive()
    idb = backend.resource(backend.blob("bad"), arch)
    tar = make_tar(backend.tmp / "t.tar", [(member(idb), b"flipped")])
    proc = backend.ctl("tape", "register", "-y", backend.name("TAPE"), "1", str(tar))
    assert proc.returncode == 1 and "does not match the registered" in proc.stderr


def test_register_hashes_folder_resource_as_neurobank_does(backend: Backend) -> None:
    """A folder resource is located when its members' directory hash equals nbank's hash."""
    _, arch = backend.archive()
    files = folder(backend, "dir")
    idd = backend.registry.add_resource(
        dtype=backend.dtype, archive=arch, name=backend.name("d"), sha1=folder_sha1(backend, files)
    ).name
    tar = make_tar(backend.tmp / "t.tar", folder_members(f"resources/{idd[:2]}/{idd}", files))
    tape = backend.name("TAPE")
    proc = backend.ctl("tape", "register", tape, "0", str(tar))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [loc.key for loc in tape_locations(backend, idd)] == [f"resources/{idd[:2]}/{idd}"]
    assert "SHA-1 checked" in proc.stderr and "sub/b.bin" not in proc.stderr


def test_register_refuses_folder_with_a_changed_file(backend: Backend) -> None:
    """A folder resource with one changed file inside gets no location; exit 1 names it."""
    _, arch = backend.archive()
    files = folder(backend, "dir")
    idd = backend.registry.add_resource(
        dtype=backend.dtype, archive=arch, name=backend.name("d"), sha1=folder_sha1(backend, files)
    ).name
    changed = {**files, "sub/deeper/c": b"flipped"}
    tar = make_tar(backend.tmp / "t.tar", folder_members(idd, changed))
    proc = backend.ctl("tape", "register", backend.name("TAPE"), "0", str(tar))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"of folder '{idd}' does not match" in proc.stderr and f"'{idd}'" in proc.stderr
    assert tape_locations(backend, idd) == []


def test_register_refuses_folder_holding_a_symlink(backend: Backend) -> None:
    """A folder resource holding a symbolic link cannot be hashed: no location, exit 1."""
    _, arch = backend.archive()
    files = folder(backend, "dir")
    idd = backend.registry.add_resource(
        dtype=backend.dtype, archive=arch, name=backend.name("d"), sha1=folder_sha1(backend, files)
    ).name
    tar_path = make_tar(backend.tmp / "t.tar", folder_members(idd, files))
    with tarfile.open(tar_path, "a") as tar:
        link = tarfile.TarInfo(f"{idd}/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    proc = backend.ctl("tape", "register", backend.name("TAPE"), "0", str(tar_path))
    assert proc.returncode == 1 and f"it holds '{idd}/link', not a file or folder" in proc.stderr
    assert tape_locations(backend, idd) == []


def test_register_keys_keyless_location_without_duplicate(backend: Backend) -> None:
    """A keyless tape location (as nbank writes it) gets the member path as key, once."""
    _, arch = backend.archive()
    a = backend.blob("a")
    ida = backend.resource(a, arch)
    tape = backend.name("TAPE")
    backend.registry.add_archive(f"{tape}-5", "tape", f"{tape}:5", "offline")
    backend.registry.add_location(ida, f"{tape}-5")
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a)])
    proc = backend.ctl("tape", "register", tape, "5", str(tar))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{member(ida)} -> recorded the member name (SHA-1 checked)" in proc.stderr
    assert tape_locations(backend, ida) == [
        LocationRecord(f"{tape}-5", "tape", f"{tape}:5", ida, member(ida))
    ]


def test_register_keeps_keyless_location_when_key_is_taken(backend: Backend) -> None:
    """If another resource holds the member path as key, the keyless location stays; exit 1."""
    _, arch = backend.archive()
    a = backend.blob("a")
    ida, other = backend.resource(a, arch), backend.resource(backend.blob("o"), arch)
    tape = backend.name("TAPE")
    backend.registry.add_archive(f"{tape}-5", "tape", f"{tape}:5", "offline")
    backend.registry.add_location(ida, f"{tape}-5")
    backend.registry.add_location(other, f"{tape}-5", key=member(ida))
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a)])
    proc = backend.ctl("tape", "register", tape, "5", str(tar))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"✗ {member(ida)} ->" in proc.stderr
    assert [loc.key for loc in tape_locations(backend, ida)] == [None]


def test_register_leaves_keyless_location_of_mismatch_keyless(backend: Backend) -> None:
    """A keyless tape location whose member does not match stays keyless; exit 1."""
    _, arch = backend.archive()
    ida = backend.resource(backend.blob("a"), arch)
    tape = backend.name("TAPE")
    backend.registry.add_archive(f"{tape}-5", "tape", f"{tape}:5", "offline")
    backend.registry.add_location(ida, f"{tape}-5")
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), b"flipped")])
    proc = backend.ctl("tape", "register", tape, "5", str(tar))
    assert proc.returncode == 1 and "stays keyless" in proc.stderr
    assert [loc.key for loc in tape_locations(backend, ida)] == [None]


def test_register_locates_resource_without_sha1_as_unverified(backend: Backend) -> None:
    """A resource registered without a SHA-1 is located with its key and said unverified."""
    _, arch = backend.archive()
    a = backend.blob("a")
    ida = backend.resource(a, arch, hashed=False)
    tar = make_tar(backend.tmp / "t.tar", [(member(ida), a)])
    proc = backend.ctl("tape", "register", backend.name("TAPE"), "0", str(tar))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no registered SHA-1 to check" in proc.stderr
    assert [loc.key for loc in tape_locations(backend, ida)] == [member(ida)]


def test_register_truncated_tar_keeps_what_was_read(backend: Backend) -> None:
    """A tar cut short: members read whole are located, the rest not, and exit 1."""
    _, arch = backend.archive()
    a, b = backend.blob("a"), os.urandom(64 << 10)
    ida, idb = backend.resource(a, arch), backend.resource(b, arch)
    whole = make_tar(backend.tmp / "whole.tar", [(member(ida), a), (member(idb), b)])
    cut = backend.tmp / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: 3 * 512 + len(b) // 2])
    proc = backend.ctl("tape", "register", backend.name("TAPE"), "0", str(cut))
    assert proc.returncode == 1 and f"✗ {cut} -> unreadable" in proc.stderr
    assert [loc.key for loc in tape_locations(backend, ida)] == [member(ida)]
    assert tape_locations(backend, idb) == []


# --- prune -----------------------------------------------------------------------------


def _prune_setup(backend: Backend) -> tuple[Archive, str, dict[str, str], dict[str, Path]]:
    """An archive with: a resource on tape (with key), one only here, one verified in a
    second local archive, one registered there but missing."""
    archive, arch = backend.archive()
    other, other_name = backend.archive("other")
    tape = tape_archive(backend)
    ids: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for label in ("taped", "only", "copied", "phantom"):
        data = backend.blob(label)
        ids[label] = backend.resource(data, arch)
        paths[label] = store(archive, ids[label], data)
    backend.registry.add_location(ids["taped"], tape, key=member(ids["taped"]))
    for label in ("copied", "phantom"):
        backend.registry.add_location(ids[label], other_name)
    store(other, ids["copied"], backend.blob("copied"))
    return archive, arch, ids, paths


def test_prune_deletes_only_verified_second_copies(backend: Backend) -> None:
    """prune deletes copies stored verifiably elsewhere and keeps every only copy."""
    _, arch, ids, paths = _prune_setup(backend)
    listing = backend.tmp / "ids.txt"
    listing.write_text("\n".join(ids.values()) + "\n")
    proc = backend.ctl("tape", "prune", arch, str(listing))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("taped", "copied"):
        assert not paths[label].exists()
        assert arch not in backend.registry.get_resource(ids[label]).locations  # type: ignore[union-attr]
    for label in ("only", "phantom"):
        assert paths[label].exists(), label
        assert arch in backend.registry.get_resource(ids[label]).locations  # type: ignore[union-attr]
        assert f"{ids[label]} -> kept" in proc.stderr
    assert "this archive is the only location" in proc.stderr and "is missing" in proc.stderr


def test_prune_keeps_copy_whose_second_location_is_itself(backend: Backend) -> None:
    """An archive registered again under a symlinked root is not a second copy: kept."""
    archive, arch = backend.archive()
    alias = backend.tmp / "alias"
    alias.symlink_to(archive.path)
    alias_name = backend.name("alias")
    backend.registry.add_archive(alias_name, "neurobank", str(alias))
    data = backend.blob("self")
    id = backend.resource(data, arch)
    path = store(archive, id, data)
    backend.registry.add_location(id, alias_name)
    proc = backend.ctl("tape", "prune", arch, "-", input=id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert path.exists() and "this very copy" in proc.stderr
    assert arch in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def test_prune_removes_emptied_stub_folders(backend: Backend) -> None:
    """prune removes a two-character folder it empties and keeps one still in use."""
    archive, arch = backend.archive()
    tape = tape_archive(backend)
    data = backend.blob("alone")
    id = backend.resource(data, arch, name="zq" + backend.name())
    path = store(archive, id, data)
    backend.registry.add_location(id, tape, key=member(id))
    keep_data = backend.blob("kept")
    kept = store(archive, backend.resource(keep_data, arch), keep_data)
    proc = backend.ctl("tape", "prune", arch, "-", input=id + "\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not path.parent.exists() and kept.parent.is_dir()
    assert f"remove empty {path.parent}" in proc.stderr


def test_prune_dry_run_deletes_nothing(backend: Backend) -> None:
    """prune --dry-run says what it would delete and changes neither files nor registry."""
    archive, arch, ids, paths = _prune_setup(backend)
    before = tree(archive.path)
    locations = {id: backend.registry.get_locations(id) for id in ids.values()}
    proc = backend.ctl("tape", "prune", "--dry-run", arch, "-", input="\n".join(ids.values()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"would delete {paths['taped']}" in proc.stderr
    assert tree(archive.path) == before
    assert {id: backend.registry.get_locations(id) for id in ids.values()} == locations


def test_prune_unknown_id_is_reported(backend: Backend) -> None:
    """prune reports an id the registry does not know and exits 1, deleting nothing."""
    _, arch = backend.archive()
    missing = backend.name("nope")
    proc = backend.ctl("tape", "prune", arch, "-", input=missing)
    assert proc.returncode == 1 and f"{missing} -> not in registry" in proc.stderr


def test_prune_refuses_keyless_tape_copy_naming_the_fix(backend: Backend) -> None:
    """A tape location without a key is refused with the tape register command; exit 1."""
    archive, arch = backend.archive()
    data = backend.blob("nokey")
    id = backend.resource(data, arch)
    path = store(archive, id, data)
    tape = backend.name("TAPE")
    backend.registry.add_archive(f"{tape}-7", "tape", f"{tape}:7", "offline")
    backend.registry.add_location(id, f"{tape}-7")
    proc = backend.ctl("tape", "prune", arch, "-", input=id)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"✗ {id} -> refused to delete {path}" in proc.stderr
    assert f"run 'nbankctl tape register {tape} 7 TAR'" in proc.stderr
    assert path.exists() and arch in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def test_prune_fix_command_names_a_custom_archive(backend: Backend) -> None:
    """For a tape archive not named TAPE-N, the command to run carries -n NAME."""
    archive, arch = backend.archive()
    data = backend.blob("nokey")
    id = backend.resource(data, arch)
    store(archive, id, data)
    tape = tape_archive(backend)  # named NAME, root NAME:1
    backend.registry.add_location(id, tape)
    proc = backend.ctl("tape", "prune", arch, "-", input=id)
    assert proc.returncode == 1
    assert f"run 'nbankctl tape register -n {tape} {tape} 1 TAR'" in proc.stderr


def test_prune_keeps_resource_without_sha1(backend: Backend) -> None:
    """A resource with no registered SHA-1 is refused without --unverified; exit 1."""
    archive, arch = backend.archive()
    data = backend.blob("nohash")
    id = backend.resource(data, arch, hashed=False)
    path = store(archive, id, data)
    backend.registry.add_location(id, tape_archive(backend), key=member(id))
    proc = backend.ctl("tape", "prune", arch, "-", input=id)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "has no registered SHA-1" in proc.stderr and "--unverified" in proc.stderr
    assert path.exists() and arch in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def test_prune_unverified_deletes_resource_without_sha1(backend: Backend) -> None:
    """With --unverified, a resource with no SHA-1 and a keyed tape copy is pruned."""
    archive, arch = backend.archive()
    data = backend.blob("nohash")
    id = backend.resource(data, arch, hashed=False)
    path = store(archive, id, data)
    backend.registry.add_location(id, tape_archive(backend), key=member(id))
    proc = backend.ctl("tape", "prune", "--unverified", arch, "-", input=id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not path.exists() and "unverified: no registered SHA-1" in proc.stderr
    assert arch not in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def _nbank_archive_with_folder(backend: Backend) -> tuple[Archive, str, str, str, Path]:
    """An archive holding a file resource and a folder resource, exported by the real
    nbank to a tar; returns (archive, name, file id, folder id, tar)."""
    archive, arch = backend.archive()
    data = backend.blob("file")
    idf = backend.resource(data, arch)
    store(archive, idf, data)
    files = folder(backend, "dir")
    idd = backend.registry.add_resource(
        dtype=backend.dtype, archive=arch, name=backend.name("d"), sha1=folder_sha1(backend, files)
    ).name
    root = archive.resources_dir / idd[:2] / idd
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    (root / "empty").mkdir()
    tar = backend.tmp / "export.tar"
    exported = backend.nbank("export", "-a", arch, str(tar), idf, idd)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    return archive, arch, idf, idd, tar


def test_nbank_register_tar_then_prune_needs_tape_register(django_backend: Backend) -> None:
    """After nbank register-tar, prune refuses; after tape register on the same tar
    (written by nbank export, with a folder resource), prune deletes both copies."""
    backend = django_backend
    archive, arch, idf, idd, tar = _nbank_archive_with_folder(backend)
    tape = backend.name("TAPE")
    theirs = backend.nbank("archive", "register-tar", tape, "2", str(tar))
    assert theirs.returncode == 0, theirs.stdout + theirs.stderr
    listing = f"{idf}\n{idd}\n"
    refused = backend.ctl("tape", "prune", arch, "-", input=listing)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.count(f"run 'nbankctl tape register {tape} 2 TAR'") == 2
    assert archive.stored_path(idf) is not None and archive.stored_path(idd) is not None
    ours = backend.ctl("tape", "register", tape, "2", str(tar))
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert ours.stderr.count("recorded the member name (SHA-1 checked)") == 2
    for id in (idf, idd):
        assert len(tape_locations(backend, id)) == 1 and tape_locations(backend, id)[0].key
    pruned = backend.ctl("tape", "prune", arch, "-", input=listing)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert archive.stored_path(idf) is None and archive.stored_path(idd) is None
    assert f"tape://{tape}:2/{idd}" in backend.nbank("locate", idd).stdout


def test_register_refuses_corrupted_member_of_nbank_export(django_backend: Backend) -> None:
    """A byte flipped in a folder resource's file inside nbank's export tar is caught."""
    backend = django_backend
    _, _, idf, idd, tar = _nbank_archive_with_folder(backend)
    with tarfile.open(tar) as t:
        target = next(m for m in t.getmembers() if m.name.endswith("sub/b.bin"))
    raw = bytearray(tar.read_bytes())
    raw[target.offset_data] ^= 0xFF
    tar.write_bytes(bytes(raw))
    checked = backend.nbank("check", "tar", str(tar))
    proc = backend.ctl("tape", "register", backend.name("TAPE"), "0", str(tar))
    assert checked.returncode == 1 and proc.returncode == 1, proc.stdout + proc.stderr
    assert f"of folder '{idd}' does not match" in proc.stderr
    assert tape_locations(backend, idd) == [] and len(tape_locations(backend, idf)) == 1


# --- import ----------------------------------------------------------------------------


def _import_setup(backend: Backend, labels: tuple[str, ...]) -> tuple[Archive, str, dict[str, str]]:
    """A fresh destination archive and resources registered only on a tape archive."""
    archive, arch = backend.archive("dest")
    tape = tape_archive(backend)
    ids = {label: backend.resource(backend.blob(label), tape) for label in labels}
    return archive, arch, ids


def test_import_places_files_with_modes_and_location(backend: Backend) -> None:
    """import copies each registered member into resources/ read-only and adds the location."""
    archive, arch, ids = _import_setup(backend, ("a", "b"))
    tar = make_tar(
        backend.tmp / "t.tar",
        [(member(ids[x], ".wav"), backend.blob(x)) for x in ("a", "b")] + [("readme", b"r")],
    )
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label, id in ids.items():
        path = archive.resources_dir / id[:2] / f"{id}.wav"
        assert path.read_bytes() == backend.blob(label)
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2775
        assert arch in backend.registry.get_resource(id).locations  # type: ignore[union-attr]
    assert os.listdir(archive.staging_dir) == []
    assert backend.ctl("archive", "check", "-H", str(archive.path)).returncode == 0
    if backend.url is not None:
        check = backend.nbank("archive", "check", str(archive.path))
        assert check.returncode == 0, check.stdout + check.stderr


def test_import_as_another_user_than_the_archive_owner_is_refused(backend: Backend) -> None:
    """An archive whose access.user is someone else refuses the import (exit 2), naming
    the user; nothing is stored."""
    archive, _, ids = _import_setup(backend, ("a",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["a"], ".wav"), backend.blob("a"))])
    config = json.loads(archive.config_path.read_text())
    config["policy"]["access"]["user"] = "nobody"
    archive.config_path.write_text(json.dumps(config))
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 2
    assert "'nobody'" in proc.stderr
    assert not any(archive.resources_dir.rglob("*.wav"))


def test_import_refuses_member_with_wrong_sha1(backend: Backend) -> None:
    """A member whose bytes differ from the registered SHA-1 is refused and leaves nothing."""
    archive, arch, ids = _import_setup(backend, ("a",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["a"]), b"not the registered bytes")])
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 1
    assert f"{member(ids['a'])} -> SHA-1" in proc.stderr and "does not match" in proc.stderr
    assert list(archive.resources_dir.iterdir()) == [] or not any(
        archive.resources_dir.rglob("*.dat")
    )
    assert os.listdir(archive.staging_dir) == []
    assert arch not in backend.registry.get_resource(ids["a"]).locations  # type: ignore[union-attr]


def test_import_refuses_crafted_members_and_writes_nothing_outside(backend: Backend) -> None:
    """'..', absolute, control-character, symlink, hardlink and FIFO members are refused
    one by one; only the honest member is written, and nothing around the archive
    changes."""
    labels = ("good", "dots", "abs", "ctrl", "sym", "hard", "fifo")
    archive, arch, ids = _import_setup(backend, labels)
    work = backend.tmp / "work"
    work.mkdir()
    outside = backend.tmp / "outside"
    outside.mkdir()
    evil = {
        "dots": f"../{ids['dots']}.dat",
        "abs": f"{outside}/{ids['abs']}.dat",
        "ctrl": f"{ids['ctrl']}\n.dat",
        "sym": member(ids["sym"]),
        "hard": member(ids["hard"]),
        "fifo": member(ids["fifo"]),
    }
    tar_path = backend.tmp / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        good = tarfile.TarInfo(member(ids["good"]))
        good.size = len(backend.blob("good"))
        tar.addfile(good, io.BytesIO(backend.blob("good")))
        for label in ("dots", "abs", "ctrl"):
            info = tarfile.TarInfo(evil[label])
            info.size = len(backend.blob(label))
            tar.addfile(info, io.BytesIO(backend.blob(label)))
        for label, kind, target in (
            ("sym", tarfile.SYMTYPE, "/etc/passwd"),
            ("hard", tarfile.LNKTYPE, member(ids["good"])),
            ("fifo", tarfile.FIFOTYPE, ""),
        ):
            info = tarfile.TarInfo(evil[label])
            info.type, info.linkname = kind, target
            tar.addfile(info)
    state = backend.tmp / "state"
    skip = (archive.resources_dir, archive.staging_dir, state, backend.tmp / "home")
    before = tree(backend.tmp, skip=skip)
    proc = backend.ctl("tape", "import", str(tar_path), str(archive.path))
    assert proc.returncode == 1
    for label, why in (
        ("dots", "a path with '..'"),
        ("abs", "an absolute path"),
        ("ctrl", "a name with a control character"),
        ("sym", "a symbolic link"),
        ("hard", "a hard link"),
        ("fifo", "a FIFO"),
    ):
        assert f"refused member {evil[label]!r}: {why}" in proc.stderr, proc.stderr
        assert arch not in backend.registry.get_resource(ids[label]).locations  # type: ignore[union-attr]
    assert tree(backend.tmp, skip=skip) == before
    stored = sorted(p.name for p in archive.resources_dir.rglob("*") if p.is_file())
    assert stored == [f"{ids['good']}.dat"]
    assert os.listdir(archive.staging_dir) == []
    assert not Path("/etc", f"{ids['dots']}.dat").exists()


def test_import_refuses_oversize_member(backend: Backend) -> None:
    """import --max-size refuses a larger member, naming it, and writes nothing."""
    archive, _, ids = _import_setup(backend, ("big",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["big"]), backend.blob("big"))])
    proc = backend.ctl("tape", "import", "--max-size", "5", str(tar), str(archive.path))
    assert proc.returncode == 1
    assert f"refused member {member(ids['big'])!r}" in proc.stderr and "limit of 5" in proc.stderr
    assert not any(p.is_file() for p in archive.resources_dir.rglob("*"))


def test_import_dry_run_writes_nothing(backend: Backend) -> None:
    """import --dry-run checks hashes but writes no file and adds no location."""
    archive, arch, ids = _import_setup(backend, ("a",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["a"]), backend.blob("a"))])
    before = tree(archive.path)
    proc = backend.ctl("tape", "import", "-y", str(tar), str(archive.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checks OK (dry run)" in proc.stderr
    assert tree(archive.path) == before
    assert arch not in backend.registry.get_resource(ids["a"]).locations  # type: ignore[union-attr]


def test_import_again_skips_resources_already_there(backend: Backend) -> None:
    """A second import of the same tar skips what the archive already holds."""
    archive, arch, ids = _import_setup(backend, ("a",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["a"]), backend.blob("a"))])
    assert backend.ctl("tape", "import", str(tar), str(archive.path)).returncode == 0
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 0 and "is already in" in proc.stderr
    assert [loc.archive_name for loc in backend.registry.get_locations(ids["a"])].count(arch) == 1


def test_import_only_named_ids(backend: Backend) -> None:
    """import TAR ARCHIVE ID -f FILE imports the ids given both ways and nothing else."""
    archive, arch, ids = _import_setup(backend, ("a", "b", "c"))
    tar = make_tar(
        backend.tmp / "t.tar", [(member(ids[x]), backend.blob(x)) for x in ("a", "b", "c")]
    )
    listing = backend.tmp / "ids.txt"
    listing.write_text(f"# wanted\n{ids['c']}\n")
    proc = backend.ctl("tape", "import", str(tar), str(archive.path), ids["b"], "-f", str(listing))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert archive.stored_path(ids["a"]) is None
    for label in ("b", "c"):
        assert archive.stored_path(ids[label]) is not None
        assert arch in backend.registry.get_resource(ids[label]).locations  # type: ignore[union-attr]
    assert ids["a"] not in proc.stderr


def test_import_reports_id_not_in_tar(backend: Backend) -> None:
    """An id asked for that the tar does not hold is reported and exits 1; the rest import."""
    archive, _, ids = _import_setup(backend, ("a",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["a"]), backend.blob("a"))])
    absent = backend.name("absent")
    proc = backend.ctl("tape", "import", str(tar), str(archive.path), ids["a"], absent)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"✗ {absent} -> not in tar file {tar}" in proc.stderr
    assert archive.stored_path(ids["a"]) is not None


def test_import_empty_id_file_is_a_usage_error(backend: Backend) -> None:
    """import -f FILE with no identifiers in FILE exits 2, naming the file."""
    archive, _, ids = _import_setup(backend, ("a",))
    tar = make_tar(backend.tmp / "t.tar", [(member(ids["a"]), backend.blob("a"))])
    empty = backend.tmp / "empty.txt"
    empty.write_text("\n")
    proc = backend.ctl("tape", "import", str(tar), str(archive.path), "-f", str(empty))
    assert proc.returncode == 2 and str(empty) in proc.stderr
    assert archive.stored_path(ids["a"]) is None


def test_import_named_ids_like_nbank_import_tar(django_backend: Backend) -> None:
    """nbank import-tar and tape import, given the same ids, import the same resources
    and both exit 1 for an id the tar lacks."""
    backend = django_backend
    ours, _, ids = _import_setup(backend, ("a", "b", "c"))
    theirs, _ = backend.archive("theirs")
    tar = make_tar(
        backend.tmp / "t.tar", [(member(ids[x]), backend.blob(x)) for x in ("a", "b", "c")]
    )
    absent = backend.name("absent")
    wanted = (ids["a"], ids["c"], absent)
    mine = backend.ctl("tape", "import", str(tar), str(ours.path), *wanted)
    nbank = backend.nbank("archive", "import-tar", str(tar), str(theirs.path), *wanted)
    assert (mine.returncode, nbank.returncode) == (1, 1), nbank.stdout + nbank.stderr
    imported = {a: {x for x, i in ids.items() if a.stored_path(i)} for a in (ours, theirs)}
    assert imported[ours] == imported[theirs] == {"a", "c"}


# --- where the lines go: stderr as nbank's log; with --json, JSON lines on stdout ------


def _one_resource_run(
    backend: Backend, command: str, *options: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Runs `tape COMMAND OPTIONS` on one resource it succeeds with; returns the run and
    the item its line names."""
    archive, arch = backend.archive()
    data = backend.blob(command)
    if command == "register":
        id = backend.resource(data, arch)
        tar = make_tar(backend.tmp / "t.tar", [(member(id), data)])
        argv = ["register", *options, backend.name("TAPE"), "0", str(tar)]
        return backend.ctl("tape", *argv), member(id)
    if command == "prune":
        id = backend.resource(data, arch)
        store(archive, id, data)
        backend.registry.add_location(id, tape_archive(backend), key=member(id))
        return backend.ctl("tape", "prune", *options, arch, "-", input=id), id
    id = backend.resource(data, tape_archive(backend))
    tar = make_tar(backend.tmp / "t.tar", [(member(id), data)])
    return backend.ctl("tape", "import", *options, str(tar), str(archive.path)), member(id)


@pytest.mark.parametrize("command", ["register", "prune", "import"])
def test_tape_lines_go_to_stderr(backend: Backend, command: str) -> None:
    """tape register, prune and import write their header, one line per item and the
    summary to standard error, as nbank's log; standard output stays empty."""
    proc, item = _one_resource_run(backend, command)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("registry: ")
    assert f"  - {item} -> " in proc.stderr and "failed or refused: 0" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("command", ["register", "prune", "import"])
def test_tape_json_lines_go_to_stdout(backend: Backend, command: str) -> None:
    """tape COMMAND --json writes only JSON lines to standard output, the item's line
    and then the summary, and none of them to standard error."""
    proc, item = _one_resource_run(backend, command, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert item in [line.get("item") for line in lines[:-1]]
    assert lines[-1]["failed"] == 0 and "summary" in lines[-1]
    assert item not in proc.stderr and "registry: " not in proc.stderr
