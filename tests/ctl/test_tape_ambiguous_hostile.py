"""Hostile review of the tape chain of trust on ambiguous or odd tars: whatever
``tape register`` keys (and ``tape prune`` then deletes locally on its word),
``tape import`` restores exactly, by id and whole; ``check tar`` agrees with import."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, make_tar, sha1, store
from nbankd.archive.access import apply_access, apply_access_tree
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.hashing import DirectoryHasher

FILES = {"a.txt": b"alpha file", "sub/b.bin": b"beta file"}


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _allow_folders(archive: Archive) -> None:
    config = json.loads(archive.config_path.read_text())
    config["policy"]["allow_directories"] = True
    archive.config_path.write_text(json.dumps(config))


def _folder_sha1(files: dict[str, bytes]) -> str:
    hasher = DirectoryHasher()
    for rel, data in files.items():
        hasher.add(rel, sha1(data))
    return hasher.hexdigest()


def _store_folder(archive: Archive, id: str, files: dict[str, bytes]) -> Path:
    """Puts a folder resource into the archive as a deposit would."""
    stub = archive.resources_dir / id[:2]
    stub.mkdir(exist_ok=True)
    apply_access(archive, stub)
    root = stub / id
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    apply_access_tree(archive, root)
    return root


def _folder_resource(b: Backend, files: dict[str, bytes]) -> tuple[str, Path, str]:
    """A folder resource stored in a local archive that accepts folders; returns its id,
    its stored folder and the archive's name."""
    archive, arch = b.archive("src")
    _allow_folders(archive)
    id = b.registry.add_resource(
        dtype=b.dtype, archive=arch, name=b.name("d"), sha1=_folder_sha1(files)
    ).name
    return id, _store_folder(archive, id, files), arch


def _local(b: Backend, arch: str) -> Archive:
    record = b.registry.get_archive(arch)
    assert record is not None
    return open_archive(record.root)


def _file_resource(b: Backend, data: bytes, arch: str, archive: Archive) -> tuple[str, Path]:
    id = b.resource(data, arch)
    return id, store(archive, id, data)


def _register_and_prune(b: Backend, arch: str, ids: list[str], tar: Path) -> str:
    """Registers ``tar`` as a tape file, prunes ``ids`` from ``arch``; returns stderr."""
    reg = b.ctl("tape", "register", b.name("TAPE"), "0", str(tar))
    prune = b.ctl("tape", "prune", arch, "-", input="\n".join(ids) + "\n")
    return reg.stderr + prune.stderr


def _dest(b: Backend) -> Archive:
    archive, _ = b.archive("dest")
    _allow_folders(archive)
    return archive


def _tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _tar_with_infos(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _folder_members(top: str, files: dict[str, bytes]) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = [(top, None), (f"{top}/sub", None)]
    return out + [(f"{top}/{rel}", data) for rel, data in files.items()]


# --- a folder resource whose run in the tar repeats a folder entry ----------------------

#: extra folder entries inside a folder resource's own run of members: the folder
#: itself again (tar -r of the folder, or ``tar cf t.tar X X/.``), a subfolder again
REPEATS = {
    "folder-again": "{top}",
    "folder-dot": "{top}/.",
    "subfolder-again": "{top}/sub",
}


def _repeated_entry_tar(b: Backend, extra: str) -> tuple[str, Path, str, Path]:
    """A stored folder resource and a tar of it with one extra folder entry in its run."""
    id, local, arch = _folder_resource(b, FILES)
    top = f"resources/{id[:2]}/{id}"
    members = [*_folder_members(top, FILES), (extra.format(top=top), None)]
    return id, local, arch, make_tar(b.tmp / "t.tar", members)


@pytest.mark.parametrize("extra", list(REPEATS.values()), ids=list(REPEATS))
def test_a_folder_with_a_repeated_folder_entry_is_not_keyed_and_prune_keeps_it(
    embedded: Backend, extra: str
) -> None:
    """A folder resource whose run repeats a folder entry, which tape import refuses,
    gets no key from tape register: prune keeps the only copy."""
    id, local, arch, tar = _repeated_entry_tar(embedded, extra)
    out = _register_and_prune(embedded, arch, [id], tar)
    assert local.is_dir() and _tree_of(local) == FILES, out
    assert "cannot hash folder" in out, out


@pytest.mark.parametrize("extra", list(REPEATS.values()), ids=list(REPEATS))
def test_check_tar_fails_a_folder_that_import_refuses(embedded: Backend, extra: str) -> None:
    """check tar's verdict on a folder with a repeated folder entry agrees with import's refusal."""
    id, _, _, tar = _repeated_entry_tar(embedded, extra)
    dest = _dest(embedded)
    imported = embedded.ctl("tape", "import", "--dry-run", str(tar), str(dest.path), id)
    assert imported.returncode == 1, imported.stdout + imported.stderr
    check = embedded.ctl("check", "tar", str(tar))
    assert check.returncode != 0, check.stdout + check.stderr


# --- a refused member named like a folder resource ----------------------------------------


def test_a_file_inside_a_folder_named_like_a_refused_link_is_not_keyed_for_itself(
    embedded: Backend,
) -> None:
    """X/Y.dat, below folder resource X (shadowed by a link named X), belongs to X as
    whole-tar import reads it: Y gets no key from it, so prune keeps Y."""
    data = embedded.blob("y")
    xid, _, arch = _folder_resource(embedded, {"keep.txt": b"x"})
    yid, ypath = _file_resource(embedded, data, arch, _local(embedded, arch))
    link = tarfile.TarInfo(xid)
    link.type, link.linkname = tarfile.SYMTYPE, "elsewhere"
    top = tarfile.TarInfo(xid)
    top.type, top.mode = tarfile.DIRTYPE, 0o755
    tar = _tar_with_infos(
        embedded.tmp / "t.tar",
        [(link, None), (top, None), (tarfile.TarInfo(f"{xid}/{yid}.dat"), data)],
    )
    out = _register_and_prune(embedded, arch, [yid], tar)
    record = embedded.registry.get_resource(yid)
    assert record is not None and record.locations == (arch,), out
    assert ypath.read_bytes() == data, out


# --- guards: odd but honest tars go round the chain whole --------------------------------


def _pruned_file(b: Backend, label: str) -> tuple[str, bytes, Path, str]:
    """A file resource stored in a local archive; returns id, bytes, path, archive name."""
    archive, arch = b.archive("src")
    data = b.blob(label)
    id, path = _file_resource(b, data, arch, archive)
    return id, data, path, arch


def _restored(b: Backend, tar: Path, *ids: str) -> tuple[Archive, subprocess.CompletedProcess[str]]:
    dest = _dest(b)
    return dest, b.ctl("tape", "import", str(tar), str(dest.path), *ids)


def test_import_refuses_a_member_changed_after_register(embedded: Backend) -> None:
    """A member rewritten (same size, other bytes) after register and prune is refused by
    import: exit 1, nothing stored, nothing left in staging/."""
    id, data, path, arch = _pruned_file(embedded, "orig")
    tar = make_tar(embedded.tmp / "t.tar", [(f"{id}.dat", data)])
    _register_and_prune(embedded, arch, [id], tar)
    assert not path.exists()
    make_tar(tar, [(f"{id}.dat", bytes(len(data)))])
    dest, proc = _restored(embedded, tar, id)
    assert proc.returncode == 1 and "does not match" in proc.stderr, proc.stderr
    assert dest.stored_path(id) is None and list(dest.staging_dir.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    ["./{id}.dat", "{id}.dat/", "resources/xx//{id}.wav", "a/./{id}"],
    ids=["dot-slash", "trailing-slash", "double-slash", "dot-inside"],
)
def test_an_oddly_spelled_member_keyed_and_pruned_is_restored(embedded: Backend, name: str) -> None:
    """A file member whose name is spelled oddly, keyed and pruned, is restored by id."""
    id, data, path, arch = _pruned_file(embedded, "odd")
    tar = make_tar(embedded.tmp / "t.tar", [(name.format(id=id), data)])
    _register_and_prune(embedded, arch, [id], tar)
    assert not path.exists()  # keyed and pruned
    dest, proc = _restored(embedded, tar, id)
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data, proc.stderr


def test_a_hard_link_is_never_keyed_and_its_target_comes_back(embedded: Backend) -> None:
    """A hard link member naming another resource gets no key (prune keeps that one);
    the member it points at is keyed, pruned and restored."""
    id, data, path, arch = _pruned_file(embedded, "target")
    other, other_path = _file_resource(embedded, embedded.blob("o"), arch, _local(embedded, arch))
    link = tarfile.TarInfo(f"{other}.dat")
    link.type, link.linkname = tarfile.LNKTYPE, f"{id}.dat"
    tar = _tar_with_infos(
        embedded.tmp / "t.tar", [(tarfile.TarInfo(f"{id}.dat"), data), (link, None)]
    )
    _register_and_prune(embedded, arch, [id, other], tar)
    assert other_path.exists() and not path.exists()
    dest, proc = _restored(embedded, tar)
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data, proc.stderr
    assert dest.stored_path(other) is None


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_a_long_member_name_keyed_and_pruned_is_restored(embedded: Backend, fmt: int) -> None:
    """A member whose name only a pax header or a GNU longname carries comes back."""
    id, data, path, arch = _pruned_file(embedded, "long")
    name = "/".join(["d" * 60] * 4) + f"/{id}.dat"
    tar = embedded.tmp / "t.tar"
    with tarfile.open(tar, "w", format=fmt) as out:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    _register_and_prune(embedded, arch, [id], tar)
    assert not path.exists()
    dest, proc = _restored(embedded, tar)
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data, proc.stderr


def test_a_compressed_tar_registered_from_stdin_is_restored_from_the_file(
    embedded: Backend,
) -> None:
    """A gzip tar registered from standard input and pruned is restored from the file."""
    id, data, path, arch = _pruned_file(embedded, "gz")
    tar = embedded.tmp / "t.tar.gz"
    with tarfile.open(tar, "w:gz") as out:
        info = tarfile.TarInfo(f"{id}.dat")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    with tar.open("rb") as stdin:
        reg = subprocess.run(
            [*_nbankctl(embedded), "tape", "register", embedded.name("T"), "0", "-"],
            stdin=stdin, env=embedded.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert reg.returncode == 0, reg.stderr
    embedded.ctl("tape", "prune", arch, "-", input=id + "\n")
    assert not path.exists()
    dest, proc = _restored(embedded, tar, id)
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data, proc.stderr


def _nbankctl(b: Backend) -> list[str]:
    return [NBANKCTL, *b.before]


def test_a_sparse_member_written_by_gnu_tar_is_restored_byte_for_byte(embedded: Backend) -> None:
    """A sparse member (GNU tar -S) keyed and pruned comes back with its holes as zeros."""
    archive, arch = embedded.archive("src")
    head, tail = embedded.blob("head"), embedded.blob("tail")
    data = head + bytes(300_000) + tail
    id, path = _file_resource(embedded, data, arch, archive)
    work = embedded.tmp / "sparse"
    work.mkdir()
    with (work / f"{id}.dat").open("wb") as f:
        f.write(head)
        f.seek(len(head) + 300_000)
        f.write(tail)
    tar = embedded.tmp / "t.tar"
    subprocess.run(["tar", "-S", "-cf", str(tar), "-C", str(work), f"{id}.dat"], check=True)
    with tarfile.open(tar) as t:
        assert t.getmembers()[0].issparse()
    out = _register_and_prune(embedded, arch, [id], tar)
    assert not path.exists(), out
    dest, proc = _restored(embedded, tar, id)
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data, proc.stderr


def test_a_member_named_id_tar_gz_is_not_keyed_for_id(embedded: Backend) -> None:
    """ID.tar.gz stands for 'ID.tar', which is no identifier: ID gets no key, prune keeps it."""
    id, data, path, arch = _pruned_file(embedded, "targz")
    tar = make_tar(embedded.tmp / "t.tar", [(f"{id}.tar.gz", data)])
    out = _register_and_prune(embedded, arch, [id], tar)
    assert path.exists() and path.read_bytes() == data, out


@pytest.mark.parametrize("folder_first", [True, False], ids=["folder-first", "file-first"])
def test_the_matching_one_of_a_file_and_a_folder_of_one_id_is_restored(
    embedded: Backend, folder_first: bool
) -> None:
    """A file and a folder member of one file resource, only the file matching: the file
    is keyed, pruned and restored by id into an archive that accepts folders."""
    id, data, path, arch = _pruned_file(embedded, "both")
    folder = _folder_members(id, FILES)
    members = [*folder, (f"{id}.dat", data)] if folder_first else [(f"{id}.dat", data), *folder]
    tar = make_tar(embedded.tmp / "t.tar", members)
    _register_and_prune(embedded, arch, [id], tar)
    assert not path.exists()
    dest, proc = _restored(embedded, tar, id)
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data, proc.stderr


def test_a_folder_resource_behind_a_damaged_copy_of_it_is_restored(embedded: Backend) -> None:
    """A folder resource appended whole after a damaged copy of it is keyed only if its
    copy is read whole; once pruned on that key it is restored by id."""
    id, local, arch = _folder_resource(embedded, FILES)
    damaged = {**FILES, "a.txt": b"alpha fil3"}
    tar = make_tar(
        embedded.tmp / "t.tar", [*_folder_members(id, damaged), *_folder_members(id, FILES)]
    )
    _register_and_prune(embedded, arch, [id], tar)
    if local.exists():
        return  # register refused the repeated folder: nothing at stake
    dest, proc = _restored(embedded, tar, id)
    stored = dest.stored_path(id)
    assert stored is not None and _tree_of(stored) == FILES, proc.stderr


def test_check_tar_fails_a_tar_with_a_damaged_header_in_the_middle(embedded: Backend) -> None:
    """A tar whose second header is damaged (a bad block on tape) fails check tar."""
    _, arch = embedded.archive("src")
    first, second = embedded.blob("1"), embedded.blob("2")
    ids = [embedded.resource(d, arch) for d in (first, second)]
    tar = make_tar(embedded.tmp / "t.tar", [(f"{ids[0]}.dat", first), (f"{ids[1]}.dat", second)])
    raw = bytearray(tar.read_bytes())
    raw[1024 : 1024 + 100] = b"\xff" * 100  # the second member's header: its name field
    tar.write_bytes(bytes(raw))
    check = embedded.ctl("check", "tar", str(tar))
    assert check.returncode != 0, check.stdout + check.stderr
