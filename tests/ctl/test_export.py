"""nbankctl export: tar, zip and folder exports of stored resources, against both registry
backends, and side by side with the real nbank 0.13 on the django-neurobank server."""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from pathlib import Path

from fixtures.cli_backends import Backend, store
from nbankd.archive.layout import Archive
from nbankd.hashing import directory_hash


def store_dir(archive: Archive, id: str, files: dict[str, bytes]) -> Path:
    """Puts a folder resource into the archive: resources/<id[:2]>/<id>/..."""
    root = archive.resources_dir / id[:2] / id
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def setup(backend: Backend, labels: tuple[str, ...] = ("a", "b")) -> tuple[Archive, str, list[str]]:
    """An archive holding one stored file resource per label."""
    archive, arch = backend.archive()
    ids = []
    for label in labels:
        data = backend.blob(label)
        id = backend.resource(data, arch)
        store(archive, id, data)
        ids.append(id)
    return archive, arch, ids


def folder_resource(backend: Backend, archive: Archive, arch: str) -> tuple[str, dict[str, bytes]]:
    """A registered folder resource with a nested file; returns its id and files."""
    files = {"x.txt": backend.blob("dx"), "sub/y.bin": backend.blob("dy")}
    id = backend.name("d")
    root = store_dir(archive, id, files)
    backend.registry.add_resource(
        dtype=backend.dtype, archive=arch, name=id, sha1=directory_hash(root)
    )
    return id, files


def leftovers(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".partial")]


def test_export_tar_holds_stored_names_and_bytes(backend: Backend) -> None:
    """A tar export has one member <id>.dat per resource, with the stored bytes."""
    _, _, ids = setup(backend)
    out = backend.tmp / "out.tar"
    proc = backend.ctl("export", str(out), *ids)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        assert tar.getnames() == [f"{id}.dat" for id in ids]
        for id, label in zip(ids, ("a", "b"), strict=True):
            assert tar.extractfile(f"{id}.dat").read() == backend.blob(label)  # type: ignore[union-attr]
    assert "Resources requested: 2; exported: 2" in proc.stderr and proc.stdout == ""


def test_export_tar_is_byte_identical_to_nbank(django_backend: Backend) -> None:
    """nbankctl export and nbank export of a file and a folder resource write the same tar."""
    backend = django_backend
    archive, arch, ids = setup(backend, ("a",))
    folder_id, _ = folder_resource(backend, archive, arch)
    ours, theirs = backend.tmp / "ours.tar", backend.tmp / "theirs.tar"
    mine = backend.ctl("export", str(ours), ids[0], folder_id)
    real = backend.nbank("export", str(theirs), ids[0], folder_id)
    assert (mine.returncode, real.returncode) == (0, 0), mine.stderr + real.stderr
    with tarfile.open(ours) as a, tarfile.open(theirs) as b:
        assert a.getnames() == b.getnames() == [
            f"{ids[0]}.dat", folder_id, f"{folder_id}/sub", f"{folder_id}/sub/y.bin",
            f"{folder_id}/x.txt",
        ]  # fmt: skip
    assert ours.read_bytes() == theirs.read_bytes()


def test_export_zip_matches_nbank_members(django_backend: Backend) -> None:
    """A zip export has the same member names and contents as nbank's."""
    backend = django_backend
    archive, arch, ids = setup(backend, ("a",))
    folder_id, _ = folder_resource(backend, archive, arch)
    ours, theirs = backend.tmp / "ours.zip", backend.tmp / "theirs.zip"
    assert backend.ctl("export", "--compress", str(ours), ids[0], folder_id).returncode == 0
    assert backend.nbank("export", "--compress", str(theirs), ids[0], folder_id).returncode == 0
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.namelist() == b.namelist()
        for info in a.infolist():
            assert info.compress_type == (
                zipfile.ZIP_STORED if info.is_dir() else zipfile.ZIP_DEFLATED
            )
            assert a.read(info) == b.read(info.filename)


def test_export_folder_writes_files_and_trees(backend: Backend) -> None:
    """A folder export holds each file resource and folder resource under its stored name."""
    archive, arch, ids = setup(backend, ("a",))
    folder_id, files = folder_resource(backend, archive, arch)
    out = backend.tmp / "outdir"
    proc = backend.ctl("export", str(out), ids[0], folder_id)
    assert proc.returncode == 0, proc.stderr
    assert (out / f"{ids[0]}.dat").read_bytes() == backend.blob("a")
    for rel, data in files.items():
        assert (out / folder_id / rel).read_bytes() == data
    assert sorted(os.listdir(out)) == sorted([f"{ids[0]}.dat", folder_id])


def test_export_leaves_out_damaged_resource(backend: Backend) -> None:
    """A stored file whose bytes differ from the registry is left out and exits 1."""
    archive, _, ids = setup(backend, ("a", "b"))
    (archive.resources_dir / ids[0][:2] / f"{ids[0]}.dat").chmod(0o644)
    (archive.resources_dir / ids[0][:2] / f"{ids[0]}.dat").write_bytes(b"flipped")
    out = backend.tmp / "out.tar"
    proc = backend.ctl("export", str(out), *ids)
    assert proc.returncode == 1
    assert f"✗ {ids[0]} ->" in proc.stderr and "does not match the registered" in proc.stderr
    with tarfile.open(out) as tar:
        assert tar.getnames() == [f"{ids[1]}.dat"]
    assert leftovers(backend.tmp) == []


def test_export_zip_drops_damaged_folder_resource(backend: Backend) -> None:
    """A folder resource that fails its hash after members were written is taken out of the zip."""
    archive, arch, ids = setup(backend, ("a", "b"))
    folder_id, _ = folder_resource(backend, archive, arch)
    (archive.resources_dir / folder_id[:2] / folder_id / "x.txt").write_bytes(b"changed")
    out = backend.tmp / "out.zip"
    proc = backend.ctl("export", str(out), ids[0], folder_id, ids[1])
    assert proc.returncode == 1 and f"✗ {folder_id} ->" in proc.stderr
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == [f"{ids[0]}.dat", f"{ids[1]}.dat"]
        assert zf.testzip() is None
    assert leftovers(backend.tmp) == []


def test_export_with_nothing_readable_creates_nothing(backend: Backend) -> None:
    """When no resource has a copy here, export exits 1 and OUT is not created."""
    _, arch = backend.archive()
    id = backend.resource(backend.blob("gone"), arch)  # registered, never stored
    out = backend.tmp / "out.tar"
    proc = backend.ctl("export", str(out), id, "nosuchid")
    assert proc.returncode == 1
    assert f"✗ {id} -> no copy on this host" in proc.stderr
    assert "✗ nosuchid -> not in the registry" in proc.stderr
    assert not out.exists() and leftovers(backend.tmp) == []


def test_export_refuses_existing_tar(backend: Backend) -> None:
    """An existing OUT tar is never replaced: exit 1, the file unchanged."""
    _, _, ids = setup(backend, ("a",))
    out = backend.tmp / "out.tar"
    out.write_bytes(b"precious")
    proc = backend.ctl("export", str(out), *ids)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert out.read_bytes() == b"precious"


def test_export_usage_errors_exit_2(backend: Backend) -> None:
    """--compress on a tar, a .gz OUT, or no identifiers at all exit 2 (nbank exits 1)."""
    _, _, ids = setup(backend, ("a",))
    assert backend.ctl("export", "--compress", str(backend.tmp / "o.tar"), *ids).returncode == 2
    assert backend.ctl("export", str(backend.tmp / "o.tar.gz"), *ids).returncode == 2
    assert backend.ctl("export", str(backend.tmp / "o.tar")).returncode == 2
    assert list(backend.tmp.glob("o.*")) == []
    if backend.url is not None:
        assert (
            backend.nbank("export", "--compress", str(backend.tmp / "n.tar"), *ids).returncode == 1
        )


def test_export_manifest_lists_records_last(backend: Backend) -> None:
    """--manifest adds manifest.json last, with each exported resource's record."""
    _, _, ids = setup(backend)
    out = backend.tmp / "out.tar"
    assert backend.ctl("export", "--manifest", str(out), *ids).returncode == 0
    with tarfile.open(out) as tar:
        assert tar.getnames()[-1] == "manifest.json"
        doc = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert [r["name"] for r in doc["resources"]] == ids
    assert all(r["path"] == f"{r['name']}.dat" and "locations" not in r for r in doc["resources"])
    assert doc["registry"] == backend.registry.url


def test_export_reads_ids_from_file_and_archive_option(backend: Backend) -> None:
    """-f FILE adds identifiers; -a ARCHIVE reads only copies in that archive."""
    _, arch, ids = setup(backend)
    listing = backend.tmp / "ids.txt"
    listing.write_text(ids[1] + "\n")
    out = backend.tmp / "out.tar"
    assert backend.ctl("export", "-a", arch, "-f", str(listing), str(out), ids[0]).returncode == 0
    with tarfile.open(out) as tar:
        assert tar.getnames() == [f"{ids[0]}.dat", f"{ids[1]}.dat"]
    _, other = backend.archive("other")
    proc = backend.ctl("export", "-a", other, str(backend.tmp / "o2.tar"), ids[0])
    assert proc.returncode == 1 and f"not in archive '{other}'" in proc.stderr


def test_export_json_goes_to_stdout(backend: Backend) -> None:
    """--json prints one line per resource and a summary on stdout, nothing on stderr."""
    _, _, ids = setup(backend, ("a",))
    proc = backend.ctl("export", "--json", str(backend.tmp / "out.tar"), ids[0])
    assert proc.returncode == 0 and proc.stderr == ""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["id"] == ids[0] and lines[0]["status"] == "exported" and lines[0]["verified"]
    assert lines[1]["summary"] == {
        "requested": 1,
        "exported": 1,
        "bytes": len(backend.blob("a")),
        "failed": 0,
    }


def test_exported_tar_is_imported_by_tape_import(backend: Backend) -> None:
    """nbankctl tape import copies the resources of an exported tar into another archive."""
    _, _, ids = setup(backend)
    out = backend.tmp / "out.tar"
    assert backend.ctl("export", str(out), *ids).returncode == 0
    dest, dest_name = backend.archive("dest")
    proc = backend.ctl("tape", "import", str(out), str(dest.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for id, label in zip(ids, ("a", "b"), strict=True):
        assert (dest.resources_dir / id[:2] / f"{id}.dat").read_bytes() == backend.blob(label)
        assert dest_name in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def test_export_refuses_link_inside_folder_resource(backend: Backend) -> None:
    """A folder resource holding a symbolic link is refused, naming the link; the file
    it points to is never read into the export."""
    archive, arch, ids = setup(backend, ("a",))
    folder_id, _ = folder_resource(backend, archive, arch)
    secret = backend.tmp / "secret"
    secret.write_bytes(b"outside the archive")
    link = archive.resources_dir / folder_id[:2] / folder_id / "sub" / "z"
    link.symlink_to(secret)
    out = backend.tmp / "out.tar"
    proc = backend.ctl("export", str(out), folder_id, ids[0])
    assert proc.returncode == 1 and f"'{link}' is a symbolic link" in proc.stderr
    with tarfile.open(out) as tar:
        assert tar.getnames() == [f"{ids[0]}.dat"]
    assert b"outside the archive" not in out.read_bytes()
