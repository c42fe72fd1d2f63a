"""nbankctl tape import of folder resources, on real tar files, against both registry
backends, and side by side with the real nbank 0.13 ``archive import-tar``."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from test_tape import (
    _nbank_archive_with_folder,
    folder,
    folder_members,
    folder_sha1,
    tape_archive,
    tree,
)

from fixtures.cli_backends import NBANKCTL, Backend, make_tar
from nbankd.archive.access import apply_access_tree
from nbankd.archive.layout import Archive


def allow_folders(archive: Archive) -> None:
    """Sets policy.allow_directories in the archive's nbank.json."""
    config = json.loads(archive.config_path.read_text())
    config["policy"]["allow_directories"] = True
    archive.config_path.write_text(json.dumps(config))


def dest_archive(backend: Backend, label: str = "dest") -> tuple[Archive, str]:
    """A fresh destination archive that accepts folder resources."""
    archive, arch = backend.archive(label)
    allow_folders(archive)
    return archive, arch


def tape_folder(backend: Backend, label: str) -> tuple[str, dict[str, bytes]]:
    """A folder resource registered only on a tape archive; returns its id and files."""
    files = folder(backend, label)
    id = backend.registry.add_resource(
        dtype=backend.dtype,
        archive=tape_archive(backend),
        name=backend.name("d"),
        sha1=folder_sha1(backend, files),
    ).name
    return id, files


def shape(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with (mode, size of files), mtimes left out. The setgid bit
    of folders inside a resource is left out too: nbank's folders inherit it from the
    stub folder they are written in, nbankd gives them the policy's exact mode (neither
    nbank's policy nor its check asks for the bit there)."""
    out = {}
    for rel, (mode, size, _) in tree(root).items():
        inside = stat.S_ISDIR(mode) and len(Path(rel).parts) >= 2
        out[rel] = (mode & ~stat.S_ISGID if inside else mode, size if stat.S_ISREG(mode) else 0)
    return out


def located(backend: Backend, id: str, arch: str) -> bool:
    return arch in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def assert_nothing_left(archive: Archive) -> None:
    assert list(archive.resources_dir.iterdir()) == []
    assert os.listdir(archive.staging_dir) == []


def test_import_folder_from_nbank_export_like_nbank_import_tar(django_backend: Backend) -> None:
    """A folder resource in a tar written by nbank export is imported into the same
    tree, with the same modes, as nbank archive import-tar writes, and passes nbank's
    archive check."""
    backend = django_backend
    _, _, idf, idd, tar = _nbank_archive_with_folder(backend)
    ours, mine = dest_archive(backend, "ours")
    theirs, _ = dest_archive(backend, "theirs")
    proc = backend.ctl("tape", "import", str(tar), str(ours.path))
    real = backend.nbank("archive", "import-tar", str(tar), str(theirs.path))
    assert (proc.returncode, real.returncode) == (0, 0), proc.stdout + real.stderr
    assert shape(ours.resources_dir) == shape(theirs.resources_dir)
    assert (ours.resources_dir / idd[:2] / idd / "sub" / "deeper" / "c").is_file()
    assert (ours.resources_dir / idd[:2] / idd / "empty").is_dir()
    assert located(backend, idd, mine) and located(backend, idf, mine)
    assert os.listdir(ours.staging_dir) == []
    check = backend.nbank("archive", "check", str(ours.path))
    assert check.returncode == 0, check.stdout + check.stderr


def test_import_folder_from_nbankctl_export(backend: Backend) -> None:
    """A folder resource in a tar written by nbankctl export is stored read-only under
    resources/<id[:2]>/<id> with every file, located, and passes archive check."""
    source, arch = backend.archive("src")
    files = folder(backend, "dir")
    id = backend.registry.add_resource(
        dtype=backend.dtype, archive=arch, name=backend.name("d"), sha1=folder_sha1(backend, files)
    ).name
    for rel, data in files.items():
        path = source.resources_dir / id[:2] / id / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    tar = backend.tmp / "ours.tar"
    exported = backend.ctl("export", str(tar), id)
    assert exported.returncode == 0, exported.stderr
    archive, dest = dest_archive(backend)
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = archive.resources_dir / id[:2] / id
    assert f"-> {root}\n" in proc.stderr, proc.stderr
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data
        assert stat.S_IMODE((root / rel).stat().st_mode) == 0o444
    assert stat.S_IMODE((root / "sub").stat().st_mode) == 0o555
    assert located(backend, id, dest)
    assert os.listdir(archive.staging_dir) == []
    check = backend.ctl("archive", "check", "-H", str(archive.path))
    assert check.returncode == 0, check.stdout + check.stderr


def test_import_refuses_folder_with_an_altered_file(backend: Backend) -> None:
    """A folder whose file differs from what was registered is refused with its SHA-1,
    leaving nothing in resources/ or staging/ and no location."""
    archive, arch = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    altered = {**files, "sub/b.bin": b"not what was registered"}
    tar = make_tar(backend.tmp / "t.tar", folder_members(id, altered))
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"of folder '{id}' does not match the registered" in proc.stderr
    assert_nothing_left(archive)
    assert not located(backend, id, arch)


def test_import_refuses_crafted_members_inside_a_folder(backend: Backend) -> None:
    """A folder holding a '..' path, a symbolic or hard link, a device, a repeated path
    or a file below a file is refused whole, naming the member; an honest folder in the
    same tar is imported and nothing outside the archive changes."""
    archive, arch = dest_archive(backend)
    good, good_files = tape_folder(backend, "good")
    evil = {label: tape_folder(backend, label) for label in
            ("dots", "sym", "hard", "dev", "twice", "below")}  # fmt: skip
    tar_path = backend.tmp / "evil.tar"

    def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, kind: bytes = b"") -> None:
        info = tarfile.TarInfo(name)
        if data is not None:
            info.size = len(data)
        if kind == tarfile.DIRTYPE:
            info.type, info.mode = kind, 0o755
        elif kind:
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else f"{name}-other"
        tar.addfile(info, io.BytesIO(data) if data is not None else None)

    extra = {
        "dots": lambda t, id: add(t, f"{id}/../escaped.txt", b"x"),
        "sym": lambda t, id: add(t, f"{id}/link", kind=tarfile.SYMTYPE),
        "hard": lambda t, id: add(t, f"{id}/hard", kind=tarfile.LNKTYPE),
        "dev": lambda t, id: add(t, f"{id}/null", kind=tarfile.CHRTYPE),
        "twice": lambda t, id: add(t, f"{id}/a.txt", b"again"),
        "below": lambda t, id: add(t, f"{id}/a.txt/inner", b"x"),
    }
    why = {
        "dots": ("../escaped.txt", "a path with '..'"),
        "sym": ("link", "a symbolic link"),
        "hard": ("hard", "a hard link"),
        "dev": ("null", "a device file"),
        "twice": ("a.txt", "a path that appears twice"),
        "below": ("a.txt/inner", "a path below the file 'a.txt'"),
    }
    with tarfile.open(tar_path, "w") as tar:
        for label, (id, files) in evil.items():
            for name, data in folder_members(id, files):
                add(tar, name, data, b"" if data is not None else tarfile.DIRTYPE)
            extra[label](tar, id)
        for name, data in folder_members(good, good_files):
            add(tar, name, data, b"" if data is not None else tarfile.DIRTYPE)
    skip = (archive.resources_dir, archive.staging_dir, backend.tmp / "state", backend.tmp / "home")
    before = tree(backend.tmp, skip=skip)
    proc = backend.ctl("tape", "import", str(tar_path), str(archive.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for label, (id, _) in evil.items():
        rel, reason = why[label]
        assert f"refused member '{id}/{rel}': {reason}" in proc.stderr, proc.stderr
        assert f"folder '{id}' not imported" in proc.stderr
        assert not located(backend, id, arch)
    assert tree(backend.tmp, skip=skip) == before
    assert os.listdir(archive.resources_dir) == [good[:2]]
    assert os.listdir(archive.resources_dir / good[:2]) == [good]
    assert located(backend, good, arch)
    assert os.listdir(archive.staging_dir) == []


def test_import_refuses_folder_larger_than_max_size(backend: Backend) -> None:
    """--max-size refuses a folder whose files add up to more than the limit, although
    each file is below it; nothing is left behind."""
    archive, _ = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    limit = max(len(d) for d in files.values()) + 1
    tar = make_tar(backend.tmp / "t.tar", folder_members(id, files))
    proc = backend.ctl("tape", "import", "--max-size", str(limit), str(tar), str(archive.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"add up to more than the limit of {limit} bytes" in proc.stderr
    assert_nothing_left(archive)


def test_import_folder_dry_run_writes_nothing(backend: Backend) -> None:
    """--dry-run checks a folder's hash but writes nothing and adds no location."""
    archive, arch = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    tar = make_tar(backend.tmp / "t.tar", folder_members(id, files))
    before = tree(archive.path)
    proc = backend.ctl("tape", "import", "-y", str(tar), str(archive.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"'{id}' checks OK (dry run)" in proc.stderr
    assert tree(archive.path) == before
    assert not located(backend, id, arch)


def test_import_folder_already_located_is_skipped_untouched(backend: Backend) -> None:
    """A second import skips a folder the archive already holds, reads past its members
    without a word about them, and changes nothing in the stored tree."""
    archive, arch = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    tar = make_tar(backend.tmp / "t.tar", folder_members(id, files))
    assert backend.ctl("tape", "import", str(tar), str(archive.path)).returncode == 0
    before = tree(archive.path)
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"'{id}' is already in '{arch}'" in proc.stderr
    assert f"{id}/a.txt" not in proc.stderr
    assert tree(archive.path) == before


def test_import_folder_never_replaces_a_different_stored_folder(backend: Backend) -> None:
    """A folder of the same name already in resources/ with other contents is kept as it
    is; the import fails naming it and registers nothing."""
    archive, arch = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    there = archive.resources_dir / id[:2] / id
    there.mkdir(parents=True)
    (there / "other.txt").write_bytes(b"someone else's")
    apply_access_tree(archive, there.parent)
    before = tree(archive.resources_dir)
    tar = make_tar(backend.tmp / "t.tar", folder_members(id, files))
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"'{there}' already holds different contents" in proc.stderr
    assert tree(archive.resources_dir) == before
    assert os.listdir(archive.staging_dir) == []
    assert not located(backend, id, arch)


def test_import_folder_into_archive_without_folders_is_refused(backend: Backend) -> None:
    """An archive whose policy does not allow folders refuses a folder resource, naming
    the setting, and the files after it in the tar are still imported."""
    archive, arch = backend.archive("dest")
    id, files = tape_folder(backend, "dir")
    after = backend.resource(backend.blob("after"), tape_archive(backend))
    tar = make_tar(
        backend.tmp / "t.tar",
        [*folder_members(id, files), (f"{after}.dat", backend.blob("after"))],
    )
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "policy.allow_directories" in proc.stderr
    assert archive.stored_path(id) is None and not located(backend, id, arch)
    assert archive.stored_path(after) is not None


def test_import_selects_folders_and_files_by_id(backend: Backend) -> None:
    """With IDS, a folder asked for is imported whole, a folder not asked for is passed
    over (its members too), and a file after it is still found."""
    archive, arch = dest_archive(backend)
    wanted, wanted_files = tape_folder(backend, "want")
    other, other_files = tape_folder(backend, "other")
    file_id = backend.resource(backend.blob("f"), tape_archive(backend))
    tar = make_tar(
        backend.tmp / "t.tar",
        [
            *folder_members(other, other_files),
            *folder_members(wanted, wanted_files),
            (f"{file_id}.dat", backend.blob("f")),
        ],
    )
    proc = backend.ctl("tape", "import", str(tar), str(archive.path), wanted, file_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert archive.stored_path(other) is None and other not in proc.stderr
    root = archive.resources_dir / wanted[:2] / wanted
    assert {rel: (root / rel).read_bytes() for rel in wanted_files} == wanted_files
    assert located(backend, wanted, arch) and located(backend, file_id, arch)
    assert archive.stored_path(file_id) is not None


def test_import_folder_cut_short_leaves_nothing(backend: Backend) -> None:
    """A tar that ends inside a folder resource's last file fails, saying the tar ends
    early, and leaves nothing in resources/ or staging/."""
    archive, arch = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    tar = make_tar(backend.tmp / "t.tar", folder_members(id, files))
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    tar.write_bytes(tar.read_bytes()[: last.offset_data + 4])
    proc = backend.ctl("tape", "import", str(tar), str(archive.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{id} -> the tar file ends early" in proc.stderr, proc.stderr
    assert_nothing_left(archive)
    assert not located(backend, id, arch)


def test_import_folder_read_from_stdin_as_a_stream(backend: Backend) -> None:
    """A tar piped on stdin ('-'), read forward only as from a tape drive, imports a
    folder resource whole and the file after it."""
    archive, arch = dest_archive(backend)
    id, files = tape_folder(backend, "dir")
    after = backend.resource(backend.blob("after"), tape_archive(backend))
    tar = make_tar(
        backend.tmp / "t.tar",
        [*folder_members(id, files), (f"{after}.dat", backend.blob("after"))],
    )
    with tar.open("rb") as stdin:
        proc = subprocess.run(
            [NBANKCTL, *backend.before, "tape", "import", "-", str(archive.path)],
            env=backend.env,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = archive.resources_dir / id[:2] / id
    assert {rel: (root / rel).read_bytes() for rel in files} == files
    assert located(backend, id, arch) and located(backend, after, arch)
