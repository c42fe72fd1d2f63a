"""nbankctl deposit beside the real nbank 0.13 on one django-neurobank server: dry runs
with the datatype's reader, zipped folders, and the options -A, -H, --animal and
--experimenter. Each test runs both tools and compares their -j records, exit
statuses and registry records."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_deposit_zip_readers import dtype, session, with_readers

from fixtures.cli_backends import Backend, json_stream
from nbankd.archive.layout import Archive


def run_both(
    b: Backend, archive: Archive, *argv: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``nbankctl deposit ARCHIVE ARGV`` and ``nbank deposit ARCHIVE ARGV``, in that order."""
    ours = b.ctl("deposit", str(archive.path), *argv)
    theirs = b.nbank("deposit", str(archive.path), *argv)
    return ours, theirs


def snapshot(*folders: Path) -> dict[str, bytes | None]:
    """Every entry under ``folders`` with a file's bytes (None for a folder)."""
    out: dict[str, bytes | None] = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = p.read_bytes() if p.is_file() else None
    return out


def user_journal(b: Backend) -> Path:
    """Where nbankctl used like nbank keeps its journal (``$XDG_STATE_HOME/nbankctl``)."""
    return Path(b.env["HOME"]) / ".local" / "state" / "nbankctl"


def without_source(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "source"}


def wav_files(b: Backend, *labels: str) -> list[Path]:
    """Files the test reader accepts (its bird is what follows "RIFF")."""
    folder = b.tmp / "rig"
    folder.mkdir(exist_ok=True)
    out = []
    for label in labels:
        f = folder / f"{b.name(label)}.wav"
        f.write_bytes(b"RIFF" + label.encode())
        out.append(f)
    return out


def two_files(b: Backend, label: str) -> tuple[Path, Path]:
    """A file for nbankctl and one for nbank, in the folder ``rig``, with unique bytes."""
    folder = b.tmp / "rig"
    folder.mkdir(exist_ok=True)
    ours, theirs = folder / f"{b.name('o')}.dat", folder / f"{b.name('t')}.dat"
    ours.write_bytes(b.blob(f"{label}-ours"))
    theirs.write_bytes(b.blob(f"{label}-theirs"))
    return ours, theirs


# --- dry runs ------------------------------------------------------------------------


def test_a_dry_run_fails_a_file_the_reader_rejects_as_nbank_does(
    django_backend: Backend,
) -> None:
    """-y, a file the reader rejects: both exit 1 with its message; nothing changes."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    bad = b.tmp / "rig" / f"{b.name('bad')}.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"junk" + b.name().encode())
    before = snapshot(b.tmp / "rig", archive.path)
    ours, theirs = run_both(b, archive, "-d", dtype(b, "wav-rec"), "-y", "-j", str(bad))
    assert (ours.returncode, theirs.returncode) == (1, 1), (ours.stderr, theirs.stderr)
    [a], [t] = json_stream(ours.stdout), json_stream(theirs.stdout)
    assert set(a) == set(t) == {"source", "error"}
    assert a["source"] == t["source"] == str(bad)
    assert "no RIFF header" in a["error"] and "no RIFF header" in t["error"]
    assert snapshot(b.tmp / "rig", archive.path) == before
    assert b.registry.get_resource(bad.stem) is None
    assert not user_journal(b).exists()


def test_a_dry_run_shows_the_readers_metadata_as_nbank_does(django_backend: Backend) -> None:
    """-y, a file the reader accepts: both print the same record with its metadata."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    [good] = wav_files(b, "zf12")
    before = snapshot(b.tmp / "rig", archive.path)
    argv = ["-d", dtype(b, "wav-rec"), "-y", "-j", "-k", "rig=3", str(good)]
    ours, theirs = run_both(b, archive, *argv)
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    assert json_stream(ours.stdout) == json_stream(theirs.stdout)
    assert json_stream(ours.stdout) == [
        {
            "source": str(good),
            "id": good.stem,
            "dry_run": True,
            "metadata": {"sampling_rate": 20000, "channels": 2, "bird": "zf12", "rig": 3},
        }
    ]
    assert snapshot(b.tmp / "rig", archive.path) == before
    assert b.registry.get_resource(good.stem) is None
    assert not user_journal(b).exists()


def test_a_dry_run_fails_given_metadata_the_file_contradicts_as_nbank(
    django_backend: Backend,
) -> None:
    """-y, a given value that differs from the file's: both exit 1 naming the key."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    [src] = wav_files(b, "zf12")
    argv = ["-d", dtype(b, "wav-rec"), "-y", "-j", "-k", "bird=given", str(src)]
    ours, theirs = run_both(b, archive, *argv)
    assert (ours.returncode, theirs.returncode) == (1, 1), (ours.stderr, theirs.stderr)
    [a], [t] = json_stream(ours.stdout), json_stream(theirs.stdout)
    assert set(a) == set(t) == {"source", "error"}
    assert "bird" in a["error"] and "bird" in t["error"]


def test_a_dry_run_overriding_the_files_metadata_shows_it_as_nbank(
    django_backend: Backend,
) -> None:
    """-y --override-file-metadata: both print the same record with the given value."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    [src] = wav_files(b, "zf12")
    argv = ["-d", dtype(b, "wav-rec"), "-y", "-j", "-k", "bird=given", str(src)]
    ours, theirs = run_both(b, archive, *argv, "--override-file-metadata")
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    [a], [t] = json_stream(ours.stdout), json_stream(theirs.stdout)
    assert a == t and a["metadata"]["bird"] == "given"


def test_a_dry_run_with_no_file_metadata_runs_no_reader_as_nbank(django_backend: Backend) -> None:
    """-y --no-file-metadata, a file the reader would reject: both print one record."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    bad = b.tmp / f"{b.name('bad')}.wav"
    bad.write_bytes(b"junk")
    argv = ["-d", dtype(b, "wav-rec"), "-y", "-j", "--no-file-metadata", str(bad)]
    ours, theirs = run_both(b, archive, *argv)
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    assert json_stream(ours.stdout) == json_stream(theirs.stdout)
    assert json_stream(ours.stdout)[0]["metadata"] == {}


def test_a_dry_run_of_a_folder_prints_nbanks_zipped_record(django_backend: Backend) -> None:
    """-y --zip-directories: both print one record, "zipped": true; nothing changes."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    src = session(b.tmp / "rig" / b.name("sess"), "dry")
    before = snapshot(b.tmp / "rig", archive.path)
    argv = ["-d", dtype(b, "wav-rec"), "-y", "-j", "-k", "rig=2", "--zip-directories", str(src)]
    ours, theirs = run_both(b, archive, *argv)
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    assert json_stream(ours.stdout) == json_stream(theirs.stdout)
    assert json_stream(ours.stdout) == [
        {
            "source": str(src),
            "id": src.name,
            "dry_run": True,
            "metadata": {"rig": 2},
            "zipped": True,
        }
    ]
    assert snapshot(b.tmp / "rig", archive.path) == before
    assert not user_journal(b).exists()


def test_a_dry_run_with_auto_identifiers_gives_no_id_as_nbank(django_backend: Backend) -> None:
    """-y -A: both print the same record, with "id": null."""
    b = django_backend
    archive, _ = b.archive()
    src = b.tmp / f"{b.name('auto')}.dat"
    src.write_bytes(b.blob("auto-dry"))
    ours, theirs = run_both(b, archive, "-d", b.dtype, "-y", "-j", "-A", str(src))
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    assert json_stream(ours.stdout) == json_stream(theirs.stdout)
    assert json_stream(ours.stdout)[0]["id"] is None


# --- deposits ------------------------------------------------------------------------


def test_a_zipped_folders_record_says_zipped_as_nbanks(django_backend: Backend) -> None:
    """--zip-directories -j: both print {"source", "id", "zipped": true}."""
    b = django_backend
    archive, _ = b.archive()
    ours_src = session(b.tmp / "rig" / b.name("ours"), "same")
    theirs_src = session(b.tmp / "rig" / b.name("theirs"), "same")
    (ours_src / "id.txt").write_bytes(b.blob("ours"))  # the registry refuses equal SHA-1s
    (theirs_src / "id.txt").write_bytes(b.blob("theirs"))
    ours = b.ctl(
        "deposit", str(archive.path), "-d", b.dtype, "-j", "--zip-directories", str(ours_src)
    )
    theirs = b.nbank(
        "deposit", str(archive.path), "-d", b.dtype, "-j", "--zip-directories", str(theirs_src)
    )
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    [a], [t] = json_stream(ours.stdout), json_stream(theirs.stdout)
    assert a == {"source": str(ours_src), "id": ours_src.name, "zipped": True}
    assert t == {"source": str(theirs_src), "id": theirs_src.name, "zipped": True}


def test_auto_identifiers_name_the_resource_as_nbank(django_backend: Backend) -> None:
    """-A: both register and store the file under a new identifier they print."""
    b = django_backend
    archive, _ = b.archive()
    ours_src, theirs_src = two_files(b, "auto")
    ours = b.ctl("deposit", str(archive.path), "-d", b.dtype, "-j", "-A", str(ours_src))
    theirs = b.nbank("deposit", str(archive.path), "-d", b.dtype, "-j", "-A", str(theirs_src))
    assert (ours.returncode, theirs.returncode) == (0, 0), (ours.stderr, theirs.stderr)
    [a], [t] = json_stream(ours.stdout), json_stream(theirs.stdout)
    assert set(a) == set(t) == {"source", "id"}
    for record, src in ((a, ours_src), (t, theirs_src)):
        id = record["id"]
        assert id not in (None, src.stem) and id.isalnum()
        stored = archive.resources_dir / id[:2] / f"{id}.dat"
        assert stored.read_bytes() == b.blob(f"auto-{'ours' if src is ours_src else 'theirs'}")
        resource = b.registry.get_resource(id)
        assert resource is not None and resource.dtype == b.dtype
        assert b.registry.get_resource(src.stem) is None and not src.exists()


def test_hash_is_accepted_and_changes_nothing(django_backend: Backend) -> None:
    """-H changes nothing: the SHA-1 is registered with or without it, as nbank -H does."""
    b = django_backend
    archive, _ = b.archive()
    srcs = []
    for label in ("plain", "hashed", "nbank"):
        src = b.tmp / f"{b.name(label)}.dat"
        src.write_bytes(b.blob(label))
        srcs.append(src)
    plain, hashed, nbanks = srcs
    assert b.ctl("deposit", str(archive.path), "-d", b.dtype, str(plain)).returncode == 0
    r = b.ctl("deposit", str(archive.path), "-d", b.dtype, "-H", "-j", str(hashed))
    t = b.nbank("deposit", str(archive.path), "-d", b.dtype, "-H", "-j", str(nbanks))
    assert (r.returncode, t.returncode) == (0, 0), (r.stderr, t.stderr)
    assert json_stream(r.stdout) == [{"source": str(hashed), "id": hashed.stem}]
    for src, label in ((plain, "plain"), (hashed, "hashed"), (nbanks, "nbank")):
        record = b.registry.get_resource(src.stem)
        assert record is not None
        assert record.sha1 == hashlib.sha1(b.blob(label)).hexdigest()


@pytest.mark.parametrize("option", ["animal", "experimenter"])
def test_a_known_animal_or_experimenter_is_registered_as_nbank_registers_it(
    django_backend: Backend, django_registry: Any, option: str
) -> None:
    """--animal ID of an animal the registry has, or --experimenter USER of the registry:
    both tools register it."""
    b = django_backend
    known = django_registry.add_animal() if option == "animal" else django_registry.reader_username
    archive, _ = b.archive()
    ours_src, theirs_src = two_files(b, option)
    argv = ["-d", b.dtype, "-j", f"--{option}", known]
    r = b.ctl("deposit", str(archive.path), *argv, str(ours_src))
    t = b.nbank("deposit", str(archive.path), *argv, str(theirs_src))
    assert (r.returncode, t.returncode) == (0, 0), (r.stderr, t.stderr)
    assert without_source(json_stream(r.stdout)[0]) == {"id": ours_src.stem}
    mine, nbanks = b.registry.get_resource(ours_src.stem), b.registry.get_resource(theirs_src.stem)
    assert mine is not None and nbanks is not None
    assert (getattr(mine, option), mine.metadata) == (getattr(nbanks, option), nbanks.metadata)
    assert getattr(mine, option) == known


@pytest.mark.parametrize("option,message", [("experimenter", "user"), ("animal", "animal")])
def test_an_unknown_experimenter_or_animal_is_refused_with_the_registrys_message(
    django_backend: Backend, option: str, message: str
) -> None:
    """An unknown experimenter or animal: both exit 1 with the registry's message."""
    b = django_backend
    archive, _ = b.archive()
    nobody = b.name("nobody")
    ours_src, theirs_src = two_files(b, "nobody")
    argv = ["-d", b.dtype, "-j", f"--{option}", nobody]
    r = b.ctl("deposit", str(archive.path), *argv, str(ours_src))
    t = b.nbank("deposit", str(archive.path), *argv, str(theirs_src))
    assert (r.returncode, t.returncode) == (1, 1), (r.stderr, t.stderr)
    [a], [n] = json_stream(r.stdout), json_stream(t.stdout)
    assert n == {"source": str(theirs_src), "error": f"{option}: no such {message} '{nobody}'"}
    assert a == {"source": str(ours_src), "error": n["error"]}
    assert ours_src.read_bytes() == b.blob("nobody-ours")
    assert b.registry.get_resource(ours_src.stem) is None
    assert sorted(p.name for p in ours_src.parent.iterdir()) == sorted(
        [ours_src.name, theirs_src.name]
    )  # no work or rejected folder left behind


def test_a_dry_run_with_a_reader_that_cannot_load_fails_as_nbank(django_backend: Backend) -> None:
    """-y, a reader that cannot be loaded: both exit 1; nothing changes."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    [src] = wav_files(b, "zf12")
    before = snapshot(b.tmp / "rig", archive.path)
    ours, theirs = run_both(b, archive, "-d", dtype(b, "broken-rec"), "-y", "-j", str(src))
    assert (ours.returncode, theirs.returncode) == (1, 1), (ours.stderr, theirs.stderr)
    assert "can't load the metadata reader for 'broken-rec'" in theirs.stderr
    [a] = json_stream(ours.stdout)
    assert a["source"] == str(src) and "cannot be loaded" in a["error"]
    assert f"{src}: would not be deposited:" in ours.stderr
    assert snapshot(b.tmp / "rig", archive.path) == before
    assert not user_journal(b).exists()


def test_a_deposit_with_a_reader_that_cannot_load_leaves_the_file_as_nbank(
    django_backend: Backend,
) -> None:
    """A real deposit whose reader cannot be loaded: both exit 1, the file stays where it
    was, nothing is registered or stored; the hint names --no-file-metadata, which then
    deposits it."""
    b = with_readers(django_backend)
    archive, _ = b.archive()
    ours_src, theirs_src = wav_files(b, "ours", "theirs")
    kind = dtype(b, "broken-rec")
    ours = b.ctl("deposit", str(archive.path), "-d", kind, "-j", str(ours_src))
    theirs = b.nbank("deposit", str(archive.path), "-d", kind, "-j", str(theirs_src))
    assert (ours.returncode, theirs.returncode) == (1, 1), (ours.stderr, theirs.stderr)
    [a] = json_stream(ours.stdout)
    assert a["source"] == str(ours_src) and "cannot be loaded" in a["error"]
    assert "--no-file-metadata" in ours.stderr
    assert sorted(p.name for p in ours_src.parent.iterdir()) == sorted(
        [ours_src.name, theirs_src.name]
    )
    assert b.registry.get_resource(ours_src.stem) is None
    assert list(archive.resources_dir.iterdir()) == []
    again = b.ctl("deposit", str(archive.path), "-d", kind, "--no-file-metadata", str(ours_src))
    assert again.returncode == 0, again.stderr
    assert not ours_src.exists() and b.registry.get_resource(ours_src.stem) is not None
