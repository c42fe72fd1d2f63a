"""How a metadata reader is confined (nbankd.metadata_readers): what it may write, what
it is told, what it leaves behind, and what a deposit does where Landlock is missing.

The readers are a real plugin package built here (a module and a ``.dist-info`` folder
declaring them in ``nbank.metadata_readers``). "Where Landlock is missing" is the test
seam ``NBANKD_READER_UNCONFINED=1`` (nbankd.seams): the child then runs the reader
unconfined, as on a kernel without Landlock.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, make_backend
from fixtures.readers import plugin_package, read_with
from fixtures.steps_env import Env
from nbankd import seams
from nbankd.deposit.lifecycle import Step
from nbankd.metadata_readers import ReaderResult, read_file_metadata
from nbankd.readerbox import landlock_abi

READERS = r"""
import os, subprocess, sys, time
from pathlib import Path

def scratch(path):
    # keeps a temporary file where it is told to, and its home's settings
    tmp = Path(os.environ["TMPDIR"]) / "decoded.bin"
    tmp.write_bytes(Path(path).read_bytes())
    (Path(os.environ["HOME"]) / ".settings").write_text("x")
    return {"tmp": str(tmp), "home": os.environ["HOME"], "cwd": os.getcwd()}

def beside(path):
    # writes an index file next to the recording it reads
    Path(os.path.realpath(path) + ".idx").write_bytes(b"index")
    return {"ok": 1}

def environment(path):
    return {"names": sorted(os.environ)}

def appending(path):
    with open(path, "ab") as f:
        f.write(b"read by confinereaders\n")
    return {"ok": 1}

def truncating(path):
    with open(path, "r+b") as f:
        f.truncate(0)
    return {"ok": 1}

def plain(path):
    return {"rate": 20000}

def lingering(path):
    # starts a helper in a session of its own, named by a token the file holds, then
    # never returns
    token = Path(path).read_text().strip()
    if os.fork() == 0:
        os.setsid()
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(3600)", token])
    time.sleep(3600)
"""

ENTRY_POINTS = """\
[nbank.metadata_readers]
scratch-rec = confinereaders:scratch
beside-rec = confinereaders:beside
env-rec = confinereaders:environment
append-rec = confinereaders:appending
trunc-rec = confinereaders:truncating
plain-rec = confinereaders:plain
linger-rec = confinereaders:lingering
"""

DATA = b"RIFF" + b"recording " * 200

landlock = pytest.mark.skipif(landlock_abi()[0] < 3, reason="needs Landlock ABI 3")


def package(root: Path) -> Path:
    """Writes the package confinereaders (its module and dist-info) into ``root``."""
    return plugin_package(root, "confinereaders", READERS, ENTRY_POINTS)


@pytest.fixture
def search(tmp_path: Path) -> list[str]:
    """The child's search path, the package on it."""
    return [*sys.path, str(package(tmp_path / "plugins"))]


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    """A recording."""
    f = tmp_path / "rec.dat"
    f.write_bytes(DATA)
    return f


@pytest.fixture
def unconfined(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers run as on a kernel without Landlock."""
    monkeypatch.setenv(seams.READER_UNCONFINED, "1")


# --- read_file_metadata ---------------------------------------------------------------


@landlock
def test_a_reader_writes_in_its_tmpdir_and_home_which_are_removed_afterwards(
    search: list[str], rec: Path
) -> None:
    """TMPDIR and HOME are one private scratch folder (also the working folder) the
    reader may write in; it is gone once the reader has answered."""
    result = read_file_metadata("scratch-rec", rec, search_path=search)
    assert result.status == "read", result.message
    assert result.metadata["home"] == result.metadata["cwd"]
    assert not Path(result.metadata["tmp"]).exists() and not Path(result.metadata["home"]).exists()


@landlock
def test_a_reader_cannot_write_beside_the_file_it_reads(search: list[str], rec: Path) -> None:
    """Writing anywhere but its scratch folder is denied: the reader fails (unavailable,
    told where it may write) and nothing appears beside the recording."""
    result = read_file_metadata("beside-rec", rec, search_path=search)
    assert result.status == "unavailable" and "only in its $TMPDIR" in result.message
    assert sorted(p.name for p in rec.parent.iterdir()) == ["plugins", "rec.dat"]


def test_the_reader_sees_only_path_the_locale_and_its_scratch_folder(
    search: list[str], rec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's environment holds PATH, LANG/LC_*, TMPDIR and HOME, nothing else of
    the daemon's."""
    monkeypatch.setenv("NBANK_REGISTRY_TOKEN", "secret")
    monkeypatch.setenv("LC_TIME", "C")
    result = read_file_metadata("env-rec", rec, search_path=search)
    assert result.status == "read", result.message
    names = set(result.metadata["names"])
    assert {"HOME", "TMPDIR", "PATH", "LC_TIME"} <= names
    assert names - {"HOME", "TMPDIR", "PATH", "LANG"} == {n for n in names if n.startswith("LC_")}


def test_unconfined_a_reader_that_writes_the_file_is_found_out(
    search: list[str], rec: Path, unconfined: None
) -> None:
    """Without Landlock, a reader appending to the file it reads is caught by its
    status afterwards: ``changed``, naming the datatype and the package."""
    result = read_file_metadata("append-rec", rec, search_path=search)
    assert result.status == "changed"
    assert "'append-rec' (from confinereaders) changed the file" in result.message


def test_unconfined_a_reader_is_never_run_on_an_only_copy(
    search: list[str], rec: Path, unconfined: None
) -> None:
    """Without Landlock, ``only_copy`` keeps the reader from the file: unavailable,
    naming Landlock and the choices, the file untouched."""
    result = read_file_metadata("trunc-rec", rec, search_path=search, only_copy=True)
    assert result.status == "unavailable" and "Landlock" in result.message
    assert "placement: copy" in result.message and "file_metadata: skip" in result.message
    assert rec.read_bytes() == DATA


def test_an_answer_nested_past_the_parents_stack_is_the_readers_failure(
    search: list[str], rec: Path, tmp_path: Path
) -> None:
    """JSON nested deeper than the parser's stack (a child answering whatever it likes)
    is unavailable, never a RecursionError out of read_file_metadata."""
    answer = tmp_path / "answer.json"
    answer.write_text("[" * 200_000 + "]" * 200_000)
    python = tmp_path / "fake-python"
    python.write_text(f"#!/bin/sh\ncat {answer}\n")
    python.chmod(0o755)
    result = read_file_metadata("plain-rec", rec, search_path=search, python=str(python))
    assert result.status == "unavailable" and "nested too deep" in result.message


def test_a_helper_in_its_own_session_is_ended_at_the_deadline(
    search: list[str], tmp_path: Path
) -> None:
    """A reader that runs out of time is ended with every process it started, even one
    in a session of its own."""
    token = f"nbankd-helper-{os.getpid()}-{time.monotonic_ns()}"
    src = tmp_path / "rec.dat"
    src.write_text(token)
    result = read_file_metadata("linger-rec", src, search_path=search, timeout=1.5)
    assert result.status == "unavailable" and "did not finish" in result.message
    deadline = time.monotonic() + 5
    while (left := _running_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, 9)
    assert left == []


def _running_with(token: str) -> list[int]:
    """The processes whose command line holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


# --- the stage step -------------------------------------------------------------------


@pytest.fixture
def plugins(env: Env) -> Path:
    """The reader package, used by the env's steps; its datatypes registered."""
    where = package(env.root / "plugins")
    read_with(env, where)
    for line in ENTRY_POINTS.splitlines()[1:]:
        env.registry.add_datatype(line.split(" = ")[0])
    return where


def test_unconfined_an_input_placed_by_rename_waits_unread(
    env: Env, plugins: Path, unconfined: None
) -> None:
    """Without Landlock, an input placed by rename (the only copy) is not handed to the
    reader: it waits as metadata-reader-unavailable, told the choices, unchanged."""
    env.reconfigure(dtype="trunc-rec", placement="rename")
    item = env.step(env.drop("song.wav", DATA, placement="rename"), Step.CLAIM)
    item = env.step(item, Step.STAGE)
    assert item.error_code == "metadata-reader-unavailable", item.error_message
    told = item.error_message or ""
    assert "Landlock" in told and "placement: copy" in told
    held = [p.read_bytes() for p in env.inbox.rglob("*") if p.is_file() and p.stat().st_size]
    assert held == [DATA]


def test_unconfined_a_reader_altering_the_staged_copy_leaves_the_input_waiting(
    env: Env, plugins: Path, unconfined: None
) -> None:
    """Without Landlock, a reader appending to the staged copy is found out at the
    stage step: the copy is discarded, the input waits unregistered, told which
    reader changed the file."""
    env.reconfigure(dtype="append-rec")
    item = env.step(env.step(env.drop("song.wav", DATA), Step.CLAIM), Step.STAGE)
    assert item.error_code == "metadata-reader-unavailable"
    assert "'append-rec' (from confinereaders) changed the file" in (item.error_message or "")
    assert [p for p in env.archive.staging_dir.iterdir() if p.is_file()] == []
    assert env.registry.get_resource("song") is None


def test_an_input_changed_by_its_reader_goes_back_as_changed(
    env: Env, plugins: Path, unconfined: None
) -> None:
    """Should a reader change the input itself (placed by rename: here a reader run
    on it unconfined, as a confinement gone wrong would), the stage step ends as
    'changed' (put back), never with the SHA-1 of bytes no longer there."""

    def careless(dtype: str, path: Path, name: str, *, only_copy: bool) -> ReaderResult:
        search = [*sys.path, str(plugins)]
        return read_file_metadata(dtype, path, name=name, search_path=search)

    env.steps.metadata_reader = careless
    env.reconfigure(dtype="append-rec", placement="rename")
    item = env.step(env.drop("song.wav", DATA, placement="rename"), Step.CLAIM)
    item = env.step(item, Step.STAGE)
    assert (item.error_code, item.sha1) == ("changed", None), item.error_message


# --- nbankctl deposit -----------------------------------------------------------------


@pytest.fixture
def ctl(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """nbankctl over an embedded registry, the reader package on its PYTHONPATH,
    readers unconfined; a recording in rig/song.wav."""
    b = make_backend("embedded", tmp_path, request)
    where = [str(package(tmp_path / "plugins")), b.env.get("PYTHONPATH", "")]
    b.env = dict(
        b.env, PYTHONPATH=os.pathsep.join(filter(None, where)), **{seams.READER_UNCONFINED: "1"}
    )
    for line in ENTRY_POINTS.splitlines()[1:]:
        b.registry.add_datatype(line.split(" = ")[0], "application/octet-stream")
    (tmp_path / "rig").mkdir()
    (tmp_path / "rig" / "song.wav").write_bytes(DATA)
    yield b
    b.registry.close()


def test_nbankctl_deposit_copies_when_the_reader_cannot_be_confined(ctl: Backend) -> None:
    """Without Landlock, nbankctl deposit copies the file (the reader reads the copy)
    where it would have moved it: the archive's file is another inode."""
    archive, _ = ctl.archive()
    src = ctl.tmp / "rig" / "song.wav"
    inode = src.stat().st_ino
    r = ctl.ctl("deposit", str(archive.path), "-d", "plain-rec", str(src))
    assert r.returncode == 0, r.stderr
    stored = [p for p in archive.resources_dir.rglob("*") if p.is_file()]
    assert [(p.read_bytes(), p.stat().st_ino != inode) for p in stored] == [(DATA, True)]


def test_nbankctl_deposit_never_lets_an_unconfined_reader_empty_the_file(
    ctl: Backend,
) -> None:
    """Without Landlock, a reader emptying what it reads empties only the copy: the
    deposit is refused (the reader changed the file) and the file is as it was."""
    archive, _ = ctl.archive()
    src = ctl.tmp / "rig" / "song.wav"
    r = ctl.ctl("deposit", str(archive.path), "-d", "trunc-rec", str(src))
    assert r.returncode != 0 and "changed the file" in r.stdout + r.stderr
    assert src.read_bytes() == DATA


def test_nbankctl_dry_run_refuses_to_run_an_unconfined_reader_on_the_file(
    ctl: Backend,
) -> None:
    """Without Landlock, the dry run does not hand the reader the user's file: it says
    the reader cannot be confined and how to deposit, the file untouched."""
    archive, _ = ctl.archive()
    src = ctl.tmp / "rig" / "song.wav"
    r = ctl.ctl("deposit", str(archive.path), "-d", "trunc-rec", "-y", str(src))
    assert "cannot be confined" in r.stdout + r.stderr and "without -y" in r.stdout + r.stderr
    assert src.read_bytes() == DATA
