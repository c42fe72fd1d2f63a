"""Hostile and unlucky inputs to the tape workflow (``tape import`` / ``tape register``).

Each test builds a real tar file, a real neurobank archive and an embedded registry,
and calls :func:`nbankd.tape_import.import_tar` / :func:`nbankd.tape_register.register_tar`
(what ``nbankctl tape import|register`` run) or ``nbankctl`` itself. Each test was a
defect a hostile review found (the guards at the end held already); each docstring
names the behaviour expected.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from fixtures.cli_backends import NBANKCTL, base_env
from nbankd import errors, tape_import, tape_register
from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive
from nbankd.hashing import DirectoryHasher
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.tape import Outcome, Summary

TAPE = "tp"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def folder_sha1(files: dict[str, bytes]) -> str:
    """neurobank's directory hash of files (relative path -> bytes)."""
    hasher = DirectoryHasher()
    for rel, data in files.items():
        hasher.add(PurePosixPath(rel), sha1(data))
    return hasher.hexdigest()


def make_tar(
    path: Path, members: list[tuple[str, bytes | None]], fmt: int = tarfile.GNU_FORMAT
) -> Path:
    """A tar of (name, bytes) members, a folder where bytes is None. GNU format keeps
    non-UTF-8 names as raw bytes, as GNU tar writes them."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class Env:
    tmp: Path
    registry: EmbeddedRegistry
    dtype: str
    archive: Archive
    name: str = "dest"

    def resource(self, name: str, data: bytes | None = None, *, sha: str | None = None) -> str:
        """Registers a resource located only on the tape archive."""
        digest = sha if sha is not None else sha1(data or b"")
        return self.registry.add_resource(
            dtype=self.dtype, archive=TAPE, name=name, sha1=digest
        ).name

    def located_here(self, id: str) -> bool:
        record = self.registry.get_resource(id)
        return record is not None and self.name in record.locations


def _env(tmp: Path, registry: EmbeddedRegistry) -> Env:
    dtype = registry.add_datatype("dt", "application/octet-stream").name
    registry.add_archive(TAPE, "tape", f"{TAPE}:1", "offline")
    archive = create_archive(tmp / "arch", registry.url, allow_directories=True)
    registry.add_archive("dest", "neurobank", str(archive.path))
    return Env(tmp, registry, dtype, archive)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    registry = EmbeddedRegistry(tmp_path / "state" / "registry.sqlite3")
    try:
        yield _env(tmp_path, registry)
    finally:
        registry.close()


def do_import(env: Env, tar: Path, **kw: object) -> tuple[Summary, dict[str, Outcome]]:
    """import_tar into env's archive; the summary and each outcome by its id (or item)."""
    summary = tape_import.import_tar(env.registry, tar, env.archive.path, **kw)  # type: ignore[arg-type]
    return summary, {(o.id or o.item): o for o in summary.outcomes}


def stored(env: Env, id: str) -> list[Path]:
    stub = env.archive.resources_dir / id[:2]
    return sorted(stub.glob(f"{id}*")) if stub.is_dir() else []


# --- odd names ---------------------------------------------------------------------------


def test_import_restores_a_resource_with_a_long_identifier(env: Env) -> None:
    """A registered identifier of 240 characters (valid: names go up to 255, and
    '<id>.wav' fits a file name) is imported like any other, and the members after it too."""
    long_id = "L" * 240
    data, other = b"long-named recording", b"the next member"
    env.resource(long_id, data)
    env.resource("next1", other)
    tar = make_tar(env.tmp / "t.tar", [(f"{long_id}.wav", data), ("next1.wav", other)])
    summary, by_id = do_import(env, tar)
    assert by_id[long_id].status == "imported", by_id[long_id]
    assert [p.read_bytes() for p in stored(env, long_id)] == [data]
    assert env.located_here(long_id)
    assert by_id["next1"].status == "imported"
    assert summary.failed == 0


def test_import_refuses_a_member_whose_stored_name_is_too_long_and_goes_on(env: Env) -> None:
    """A member whose name (a 260-character extension) cannot be a file name in the
    archive is refused on its own line; the members after it are imported and staging/
    is left empty."""
    d1, d2 = b"odd extension", b"plain member"
    env.resource("odd1", d1)
    env.resource("plain2", d2)
    tar = make_tar(env.tmp / "t.tar", [("odd1." + "x" * 260, d1), ("plain2.wav", d2)])
    summary, by_id = do_import(env, tar)
    assert not by_id["odd1"].ok
    assert by_id["plain2"].status == "imported", summary.outcomes
    assert [p.read_bytes() for p in stored(env, "plain2")] == [d2]
    assert os.listdir(env.archive.staging_dir) == []


def test_register_a_folder_with_a_non_utf8_file_name_does_not_abort_the_tape(env: Env) -> None:
    """A folder resource holding a file whose name is not UTF-8 (GNU tar keeps such names)
    is reported as not hashable; the other members of the tar are still located."""
    files = {"x": b"x-bytes"}
    env.resource("fold3", sha=folder_sha1(files))
    env.resource("good4", b"good4-bytes")
    tar = make_tar(
        env.tmp / "t.tar",
        [("good4.wav", b"good4-bytes"), ("fold3", None), ("fold3/x", b"x-bytes"),
         ("fold3/bad\udcffname", b"y")],
    )  # fmt: skip
    summary = tape_register.register_tar(env.registry, tar, "TAPEB", 1)
    by_id = {o.id: o for o in summary.outcomes if o.id}
    assert [loc.key for loc in env.registry.get_locations("good4") if loc.scheme == "tape"
            and loc.archive_name == "TAPEB-1"] == ["good4.wav"]  # fmt: skip
    assert not by_id["fold3"].ok


def test_import_refuses_a_folder_with_a_non_utf8_file_name_and_goes_on(env: Env) -> None:
    """A folder resource holding a non-UTF-8 file name is refused (nothing left in
    resources/ or staging/) and the members after it are still imported."""
    files = {"x": b"x-bytes"}
    env.resource("fold5", sha=folder_sha1(files))
    env.resource("good6", b"good6-bytes")
    tar = make_tar(
        env.tmp / "t.tar",
        [("fold5", None), ("fold5/x", b"x-bytes"), ("fold5/bad\udcffname", b"y"),
         ("good6.wav", b"good6-bytes")],
    )  # fmt: skip
    summary, by_id = do_import(env, tar)
    assert not by_id["fold5"].ok
    assert stored(env, "fold5") == [] and not env.located_here("fold5")
    assert by_id["good6"].status == "imported", summary.outcomes
    assert os.listdir(env.archive.staging_dir) == []


# --- short reads ---------------------------------------------------------------------------


def _truncated_gzip_tar(env: Env) -> tuple[Path, bytes, bytes]:
    """A .tar.gz cut two thirds of the way: the first (small) member whole, the second
    (incompressible, large) cut in the middle."""
    small, big = b"small-member", os.urandom(300_000)
    env.resource("whole1", small)
    env.resource("cut2", big)
    tar = make_tar(env.tmp / "t.tar", [("whole1.wav", small), ("cut2.wav", big)])
    raw = gzip.compress(tar.read_bytes())
    path = env.tmp / "t.tar.gz"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path, small, big


def test_import_of_a_truncated_compressed_tar_reports_the_cut_member(env: Env) -> None:
    """A .tar.gz cut short (a tape read that ended early) is reported as the plain tar's
    truncation is: the whole members imported, the cut one failed, nothing staged; no
    exception escapes."""
    path, _, _ = _truncated_gzip_tar(env)
    summary, by_id = do_import(env, path)
    assert by_id["whole1"].status == "imported"
    assert not by_id["cut2"].ok and stored(env, "cut2") == []
    assert summary.failed >= 1
    assert os.listdir(env.archive.staging_dir) == []


def test_register_of_a_truncated_compressed_tar_keeps_what_was_read_whole(env: Env) -> None:
    """tape register on a .tar.gz cut short locates the members read whole (as it does
    for a plain tar cut short) and reports the tar as unreadable, no exception escaping."""
    path, _, _ = _truncated_gzip_tar(env)
    summary = tape_register.register_tar(env.registry, path, "TAPEC", 1)
    keys = [
        loc.key for loc in env.registry.get_locations("whole1") if loc.archive_name == "TAPEC-1"
    ]
    assert keys == ["whole1.wav"]
    assert summary.failed >= 1
    assert not any(loc.archive_name == "TAPEC-1" for loc in env.registry.get_locations("cut2"))


def test_nbankctl_tape_import_of_a_truncated_compressed_tar_exits_1_without_a_traceback(
    tmp_path: Path,
) -> None:
    """nbankctl tape import on a truncated .tar.gz says which member could not be read
    and exits 1 with its summary, not a Python traceback."""
    state = tmp_path / "state"
    registry = EmbeddedRegistry(state / "registry.sqlite3")
    try:
        env = _env(tmp_path, registry)
        path, _, _ = _truncated_gzip_tar(env)
    finally:
        registry.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {state}\n")
    proc_env = base_env(tmp_path / "home")
    proc_env["NBANKD_CONFIG"] = str(config)
    proc = subprocess.run(
        [NBANKCTL, "tape", "import", str(path), str(env.archive.path)],
        env=proc_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "cut2.wav" in proc.stderr and "failed or refused: 1" in proc.stderr


# --- what register verifies, import must be able to restore -------------------------------


def test_a_folder_register_verified_can_be_imported_from_the_same_tar(env: Env) -> None:
    """When tape register keys a folder resource's tape location (so tape prune may then
    delete the local copy), tape import of that same tar restores the folder; here its
    files are not contiguous in the tar (another member between them, as `tar -r` leaves)."""
    files = {"a": b"a-bytes", "b": b"b-bytes"}
    env.resource("fold7", sha=folder_sha1(files))
    env.resource("other8", b"other8-bytes")
    tar = make_tar(
        env.tmp / "t.tar",
        [("fold7", None), ("fold7/a", b"a-bytes"), ("other8.wav", b"other8-bytes"),
         ("fold7/b", b"b-bytes")],
    )  # fmt: skip
    tape_register.register_tar(env.registry, tar, "TAPED", 1)
    keyed = [
        loc.key for loc in env.registry.get_locations("fold7") if loc.archive_name == "TAPED-1"
    ]
    _, by_id = do_import(env, tar)
    imported = by_id["fold7"].status == "imported"
    assert not keyed or imported, (keyed, by_id["fold7"])


@pytest.mark.parametrize(
    "members",
    [
        [("fold7", None), ("fold7/a", b"a-bytes"), ("other8.wav", b"o"), ("fold7/b", b"b-bytes")],
        [("fold7", None), ("fold7/a", b"a-bytes"), ("other8.wav", b"o"), ("fold7", None),
         ("fold7/b", b"b-bytes")],
    ],
    ids=["a file after another member", "the folder twice"],
)  # fmt: skip
def test_register_gives_no_location_to_a_folder_whose_members_do_not_follow_it(
    env: Env, members: list[tuple[str, bytes | None]]
) -> None:
    """A folder whose files do not all follow it (as tar -r leaves) is unverifiable:
    no tape location, the reason said."""
    env.resource("fold7", sha=folder_sha1({"a": b"a-bytes", "b": b"b-bytes"}))
    summary = tape_register.register_tar(env.registry, make_tar(env.tmp / "t.tar", members),
                                         "TAPEE", 1)  # fmt: skip
    fold = next(o for o in summary.outcomes if o.id == "fold7")
    assert not fold.ok and "do not all follow it" in fold.message
    assert [loc.archive_name for loc in env.registry.get_locations("fold7")] == [TAPE]


# --- the archive a location is recorded in ------------------------------------------------


def test_import_records_the_location_in_the_archive_it_wrote_to(env: Env) -> None:
    """Importing into /x/ARCH while another archive is registered at /x/arch (a different
    folder on a case-sensitive filesystem) records the location of the archive that holds
    the file, never the other one."""
    upper = create_archive(env.tmp / "ARCH", env.registry.url)
    env.registry.add_archive("upper", "neurobank", str(upper.path))
    data = b"imported into ARCH"
    env.resource("case9", data)
    tar = make_tar(env.tmp / "t.tar", [("case9.wav", data)])
    tape_import.import_tar(env.registry, tar, upper.path)
    assert (upper.resources_dir / "ca" / "case9.wav").read_bytes() == data
    record = env.registry.get_resource("case9")
    assert record is not None
    assert "dest" not in record.locations, record.locations
    assert "upper" in record.locations, record.locations


# --- guards that hold (passing) --------------------------------------------------------------


def test_guard_import_never_replaces_a_different_file_already_stored(env: Env) -> None:
    """GUARD (passes): a file already at the target with other bytes (not located here)
    is left untouched; the member fails and staging/ is left empty."""
    data = b"the tape's bytes"
    env.resource("keep1", data)
    theirs = env.archive.resources_dir / "ke"
    theirs.mkdir()
    (theirs / "keep1.wav").write_bytes(b"someone's own bytes")
    tar = make_tar(env.tmp / "t.tar", [("keep1.wav", data)])
    _, by_id = do_import(env, tar)
    assert not by_id["keep1"].ok
    assert (theirs / "keep1.wav").read_bytes() == b"someone's own bytes"
    assert not env.located_here("keep1")
    assert os.listdir(env.archive.staging_dir) == []


def test_guard_import_refuses_a_stub_folder_swapped_for_a_link(env: Env) -> None:
    """GUARD (passes): resources/<stub> replaced by a link to a user's folder is never
    written through; nothing lands in the user's folder and nothing is located."""
    data = b"bytes for the stub test"
    env.resource("stub1", data)
    victim = env.tmp / "victim"
    victim.mkdir()
    (env.archive.resources_dir / "st").symlink_to(victim)
    tar = make_tar(env.tmp / "t.tar", [("stub1.wav", data)])
    with pytest.raises(errors.ArchiveUnavailable, match="is not a folder"):
        do_import(env, tar)
    assert os.listdir(victim) == []
    assert not env.located_here("stub1")
