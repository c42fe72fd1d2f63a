"""nbankctl deposit --zip-directories and the metadata readers, beside the real nbank."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, json_stream
from nbankd import errors
from test_metadata_readers import reader_package


def dtype(backend: Backend, name: str) -> str:
    """Registers ``name`` (the shared django server may already have it)."""
    with contextlib.suppress(errors.RegistryRejected):
        backend.registry.add_datatype(name, "application/octet-stream")
    return name


def with_readers(backend: Backend) -> Backend:
    """The backend's commands see the test's reader package (as if pip-installed)."""
    plugins = reader_package(backend.tmp / "plugins")
    backend.env = dict(backend.env, PYTHONPATH=str(plugins))
    return backend


def session(folder: Path, label: str) -> Path:
    """A folder with nested files, as a rig's session folder."""
    folder.mkdir(parents=True)
    (folder / "a.txt").write_bytes(f"first {label}".encode())
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4 + label.encode())
    (folder / "empty").mkdir()
    return folder


def test_a_folder_is_deposited_as_nbanks_canonical_zip(backend: Backend) -> None:
    """--zip-directories registers the SHA-1 nbank's own canonical zip of the folder
    has, stores `<id>.zip`, prints nbank's record ("zipped": true) and removes the
    folder once it is deposited."""
    from nbank.canonical_zip import zip_directory

    archive, _ = backend.archive()
    src = session(backend.tmp / "rig" / backend.name("sess"), backend.name())
    reference = zip_directory(src, backend.tmp / "reference.zip")
    expected = hashlib.sha1(Path(reference).read_bytes()).hexdigest()
    r = backend.ctl(
        "deposit", str(archive.path), "-d", backend.dtype, "-j", "--zip-directories", str(src)
    )
    assert r.returncode == 0, r.stderr
    assert json_stream(r.stdout) == [{"source": str(src), "id": src.name, "zipped": True}]
    record = backend.registry.get_resource(src.name)
    assert record is not None and record.sha1 == expected
    stored = archive.resources_dir / src.name[:2] / f"{src.name}.zip"
    assert stored.read_bytes() == Path(reference).read_bytes()
    assert not src.exists()


def test_without_zip_directories_a_folder_is_refused_and_kept(backend: Backend) -> None:
    """A folder without --zip-directories is named and left alone (exit 1)."""
    archive, _ = backend.archive()
    src = session(backend.tmp / "rig" / "sess", "kept")
    r = backend.ctl("deposit", str(archive.path), "-d", backend.dtype, str(src))
    assert r.returncode == 1
    assert "--zip-directories" in r.stderr
    assert (src / "sub" / "b.bin").exists()


def test_the_readers_metadata_is_registered_and_a_bad_file_kept(backend: Backend) -> None:
    """The datatype's reader gives a good file's metadata; a file it rejects stays in
    place with the reader's message (exit 1)."""
    b = with_readers(backend)
    archive, _ = b.archive()
    folder = b.tmp / "rig"
    folder.mkdir()
    good, junk = folder / f"{b.name('g')}.wav", folder / f"{b.name('j')}.wav"
    good.write_bytes(b"RIFF" + b.name().encode()[:4])
    junk.write_bytes(b"junk" + b.name().encode())
    r = b.ctl("deposit", str(archive.path), "-d", dtype(b, "wav-rec"), "-j", str(good), str(junk))
    assert r.returncode == 1, r.stderr
    lines = {Path(d["source"]).name: d for d in json_stream(r.stdout)}
    assert "no RIFF header" in lines[junk.name]["error"]
    assert junk.exists()
    record = b.registry.get_resource(good.stem)
    assert record is not None
    assert record.metadata["sampling_rate"] == 20000


@pytest.mark.parametrize(
    "flag,expected", [("--no-file-metadata", None), ("--override-file-metadata", "given")]
)
def test_reader_flags(backend: Backend, flag: str, expected: str | None) -> None:
    """--no-file-metadata runs no reader; --override-file-metadata registers given values."""
    b = with_readers(backend)
    archive, _ = b.archive()
    src = b.tmp / f"{b.name('f')}.wav"
    src.write_bytes(b"RIFFfile" + b.name().encode())
    r = b.ctl(
        "deposit", str(archive.path), "-d", dtype(b, "wav-rec"), "-k", "bird=given", flag, str(src)
    )
    assert r.returncode == 0, r.stderr
    record = b.registry.get_resource(src.stem)
    assert record is not None
    assert record.metadata["bird"] == "given"
    assert record.metadata.get("sampling_rate") == (20000 if expected else None)


def test_given_metadata_that_differs_from_the_files_is_refused(backend: Backend) -> None:
    """Without --override-file-metadata a differing given value is an error naming the key."""
    b = with_readers(backend)
    archive, _ = b.archive()
    src = b.tmp / f"{b.name('m')}.wav"
    src.write_bytes(b"RIFFfile" + b.name().encode())
    r = b.ctl("deposit", str(archive.path), "-d", dtype(b, "wav-rec"), "-k", "bird=given", str(src))
    assert r.returncode == 1
    assert "bird" in r.stderr
    assert src.exists()


def test_nbank_reads_the_same_metadata(django_backend: Backend) -> None:
    """The same reader package gives the same registered metadata through both tools."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    folder = b.tmp / "rig"
    folder.mkdir()
    ours, theirs = folder / f"{b.name('o')}.wav", folder / f"{b.name('t')}.wav"
    ours_bird, their_bird = f"same{b.name()}", f"same{b.name()}"
    ours.write_bytes(b"RIFF" + ours_bird.encode())
    theirs.write_bytes(b"RIFF" + their_bird.encode())
    wav = dtype(b, "wav-rec")
    assert b.ctl("deposit", str(archive.path), "-d", wav, str(ours)).returncode == 0
    r = b.nbank("deposit", str(archive.path), "-d", wav, str(theirs))
    assert r.returncode == 0, r.stderr
    mine, nbanks = b.registry.get_resource(ours.stem), b.registry.get_resource(theirs.stem)
    assert mine is not None and nbanks is not None
    # the reader names the bird after the bytes that follow "RIFF"
    assert (mine.metadata["bird"], nbanks.metadata["bird"]) == (ours_bird, their_bird)
    assert dict(mine.metadata, bird=None) == dict(nbanks.metadata, bird=None)
