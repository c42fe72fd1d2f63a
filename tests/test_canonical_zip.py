"""nbankd.canonical_zip against the installed neurobank's canonical_zip (the reference)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
from nbank.canonical_zip import write_zip, zip_directory

from nbankd import errors
from nbankd.canonical_zip import (
    ZIP64_COUNT_LIMIT,
    Written,
    central_directory,
    local_header,
    zip_folder,
)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _nbank_zip(folder: Path, out: Path) -> bytes:
    return zip_directory(folder, out).read_bytes()


MIXED = {
    "a.txt": b"alpha",
    "a/b": b"nested",  # '/' sorts after '.': a.txt comes first
    "a/c/deep.bin": bytes(range(256)) * 100,
    "B.upper": b"capital",
    ".hidden": b"dot",
    "empty.dat": b"",
    "zébra/ñame-ü.wav": b"non-ascii",
    "日本/データ": b"cjk",
}


def test_same_bytes_as_nbank_for_a_nested_tree(tmp_path: Path) -> None:
    """A nested folder with hidden, empty and non-ASCII files zips to nbank's exact bytes."""
    src = _tree(tmp_path / "rec", MIXED)
    (src / "empty-folder" / "inner").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    ours = zip_folder(src, out, "rec.zip")
    theirs = _nbank_zip(src, tmp_path / "nbank.zip")
    assert ours.path.read_bytes() == theirs
    assert ours.sha1 == hashlib.sha1(theirs).hexdigest()
    assert ours.size == len(theirs)


def test_same_bytes_as_nbank_for_an_empty_folder(tmp_path: Path) -> None:
    """An empty folder (with only empty sub-folders) gives nbank's empty zip."""
    src = tmp_path / "empty"
    (src / "sub" / "subsub").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    ours = zip_folder(src, out, "e.zip")
    theirs = _nbank_zip(src, tmp_path / "nbank.zip")
    assert ours.path.read_bytes() == theirs and zipfile.ZipFile(ours.path).namelist() == []


def test_members_are_ordered_by_their_utf8_bytes(tmp_path: Path) -> None:
    """Members are stored in the order of their UTF-8 path bytes, as nbank stores them."""
    src = _tree(tmp_path / "rec", MIXED)
    out = tmp_path / "out"
    out.mkdir()
    names = zipfile.ZipFile(zip_folder(src, out, "r.zip").path).namelist()
    assert names == sorted(MIXED, key=lambda n: n.encode("utf-8"))
    assert names.index("a.txt") < names.index("a/b")


def test_mtimes_and_permissions_do_not_change_the_bytes(tmp_path: Path) -> None:
    """Two folders with the same (path, contents) pairs but other mtimes and modes give
    the same bytes."""
    one = _tree(tmp_path / "one", MIXED)
    two = _tree(tmp_path / "two", MIXED)
    for i, path in enumerate(sorted(p for p in two.rglob("*") if p.is_file())):
        os.utime(path, ns=(10**18 + i, 10**18 + i))
        path.chmod(0o600 if i % 2 else 0o755)
    (two / "a").chmod(0o700)
    out = tmp_path / "out"
    out.mkdir()
    first = zip_folder(one, out, "one.zip")
    second = zip_folder(two, out, "two.zip")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha1 == second.sha1


def test_a_symbolic_link_is_refused_naming_it(tmp_path: Path) -> None:
    """A symbolic link below the folder is refused with its path, and nothing is written."""
    src = _tree(tmp_path / "rec", {"sub/a": b"x"})
    (src / "sub" / "link").symlink_to(src / "sub" / "a")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.UnsafeInput, match=r"rec/sub/link' is a symbolic link"):
        zip_folder(src, out, "rec.zip")
    assert list(out.iterdir()) == []


def test_a_fifo_is_refused_naming_it(tmp_path: Path) -> None:
    """A FIFO below the folder is refused with its path (never opened, never waited on)."""
    src = _tree(tmp_path / "rec", {"a": b"x"})
    os.mkfifo(src / "pipe")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.UnsafeInput, match=r"rec/pipe' is a FIFO, socket or device"):
        zip_folder(src, out, "rec.zip")
    assert list(out.iterdir()) == []


def test_the_folder_itself_as_a_link_is_refused(tmp_path: Path) -> None:
    """A folder given as a symbolic link to a folder is refused, not followed."""
    real = _tree(tmp_path / "real", {"a": b"x"})
    (tmp_path / "alias").symlink_to(real)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.UnsafeInput, match="alias"):
        zip_folder(tmp_path / "alias", out, "a.zip")


def test_hard_links_are_refused_unless_allowed(tmp_path: Path) -> None:
    """A file with two names is refused by default and zipped (as nbank does) when allowed."""
    src = _tree(tmp_path / "rec", {"a": b"shared"})
    os.link(src / "a", src / "b")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.UnsafeInput, match="hard link"):
        zip_folder(src, out, "rec.zip")
    ours = zip_folder(src, out, "rec.zip", hard_links=True)
    assert ours.path.read_bytes() == _nbank_zip(src, tmp_path / "nbank.zip")


def test_an_existing_zip_is_never_written_over(tmp_path: Path) -> None:
    """A zip whose name is taken raises FileExistsError, keeps the old file and leaves
    no temporary file."""
    src = _tree(tmp_path / "rec", {"a": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "rec.zip").write_bytes(b"older")
    with pytest.raises(FileExistsError, match=r"rec\.zip"):
        zip_folder(src, out, "rec.zip")
    assert [p.name for p in out.iterdir()] == ["rec.zip"]
    assert (out / "rec.zip").read_bytes() == b"older"


def test_a_leftover_partial_file_is_replaced(tmp_path: Path) -> None:
    """A temporary file left by an interrupted attempt is replaced, and gone after."""
    src = _tree(tmp_path / "rec", {"a": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "rec.zip.partial").write_bytes(b"half a zip")
    ours = zip_folder(src, out, "rec.zip")
    assert [p.name for p in out.iterdir()] == ["rec.zip"]
    assert ours.path.read_bytes() == _nbank_zip(src, tmp_path / "nbank.zip")


def test_a_zip_name_of_250_bytes_of_non_ascii_characters_is_written(tmp_path: Path) -> None:
    """A zip named with 123 'é' and .zip (250 bytes) is written, nothing left beside it."""
    src = _tree(tmp_path / "rec", {"a": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    name = "é" * 123 + ".zip"
    assert len(os.fsencode(name)) == 250
    ours = zip_folder(src, out, name)
    assert [p.name for p in out.iterdir()] == [name]
    assert ours.path.read_bytes() == _nbank_zip(src, tmp_path / "nbank.zip")


def test_the_zip_cannot_be_written_inside_the_folder(tmp_path: Path) -> None:
    """Writing the zip into the folder being zipped is refused."""
    src = _tree(tmp_path / "rec", {"a": b"x"})
    with pytest.raises(ValueError, match="inside"):
        zip_folder(src, src, "rec.zip")


def test_zip64_count_records_match_nbank(tmp_path: Path) -> None:
    """With 65,535 members or more the ZIP64 end records are written as nbank writes them."""
    count = ZIP64_COUNT_LIMIT + 1
    names = [f"f{i:05d}" for i in range(count)]
    theirs = write_zip(tmp_path / "many.zip", [(n, b"") for n in names]).read_bytes()
    parts, written, offset = [], [], 0
    for n in names:
        header = local_header(n.encode(), 0, 0)
        parts.append(header)
        written.append(Written(n.encode(), 0, 0, offset))
        offset += len(header)
    ours = b"".join(parts) + central_directory(written, offset)
    assert ours == theirs


def test_progress_counts_every_byte_of_the_files(tmp_path: Path) -> None:
    """progress is called as bytes are zipped, ending with the total of the files' sizes."""
    src = _tree(tmp_path / "rec", MIXED)
    out = tmp_path / "out"
    out.mkdir()
    seen: list[int] = []
    zip_folder(src, out, "rec.zip", progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == sum(len(d) for d in MIXED.values())
