"""Work files in <inbox>/.nbank/ that no deposit of this daemon owns: named in status,
never touched; the daemon's own in-flight work files are not."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, status_json, wait_for, work_entries
from nbankd.daemon.orphans import WorkFolderIsLink, check, token_of, unowned, unowned_work_files
from nbankd.deposit.journal import Journal
from nbankd.names import PROBE_PREFIX

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
T1, T2 = "a" * 32, "b" * 32


@pytest.mark.parametrize(
    ("name", "token"),
    [
        (T1, T1),
        (f"{T1}.sidecar.yaml", T1),
        (f"{T1}.sidecar.json", T1),
        (f"{T1}.sidecar.txt", None),
        ("A" * 32, None),
        ("notes.txt", None),
        (T1[:-1], None),
    ],
)
def test_work_file_names_give_their_token(name: str, token: str | None) -> None:
    """Only <token> and <token>.sidecar.yaml|json are work files of a deposit."""
    assert token_of(name) == token


def test_unowned_are_names_without_a_known_token() -> None:
    """Known tokens and their sidecars are owned; other tokens and odd names are not;
    NFS placeholders of removed files are no one's input."""
    names = [T1, f"{T1}.sidecar.yaml", T2, f"{T2}.sidecar.json", "stray.wav", ".nfs0001"]
    assert unowned(names, {T1}) == sorted([T2, f"{T2}.sidecar.json", "stray.wav"])


def test_a_manual_deposits_passing_probe_is_no_ones_input() -> None:
    """The probe nbankctl deposit makes in a work folder for a moment is never
    reported as an unowned work file."""
    assert unowned([f"{PROBE_PREFIX}0123abcd", "stray.wav"], set()) == ["stray.wav"]


def test_unowned_work_files_asks_the_journal(tmp_path: Path) -> None:
    """A real journal owns what it has a row for, in any state; a missing folder is empty."""
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.add(
        token=T1,
        inbox="/in",
        relpath=b"x.dat",
        kind="file",
        archive="a",
        archive_path="/a",
        placement="copy",
        verify=1,
        created=0.0,
        updated=0.0,
    )
    work = tmp_path / ".nbank"
    assert unowned_work_files(work, journal.known_tokens) == []
    work.mkdir()
    for name in (T1, T2, "left.dat"):
        (work / name).write_bytes(b"user data")
    assert unowned_work_files(work, journal.known_tokens) == sorted([T2, "left.dat"])
    journal.close()


def test_files_left_by_a_lost_state_dir_are_reported_and_kept(daemon_factory: Any) -> None:
    """A claimed input whose journal was lost (state_dir restored from an old backup)
    degrades status, named with what to do, and stays byte for byte where it is."""
    h: DaemonHarness = daemon_factory()
    work = h.inbox / ".nbank"
    work.mkdir(parents=True)
    orphan = work / secrets.token_hex(16)
    orphan.write_bytes(b"a recording claimed by a daemon whose journal is gone")
    h.start()
    code, doc = status_json(h)
    [inbox] = doc["inboxes"]
    assert code == 1 and inbox["unowned_work_files"] == [orphan.name]
    [line] = [d for d in doc["degraded"] if ".nbank" in d]
    assert line.startswith(str(h.inbox)) and "no deposit of this daemon owns" in line
    assert "under its original name" in line and "stop one of them" in line
    assert orphan.read_bytes() == b"a recording claimed by a daemon whose journal is gone"


def test_own_work_file_in_flight_is_not_reported(daemon_factory: Any) -> None:
    """An input held right after its claim (its work file in .nbank/) is not unowned."""
    h: DaemonHarness = daemon_factory()
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(go)})
    h.drop("held.dat", b"held after its claim")
    work = h.inbox / ".nbank"
    wait_for(lambda: work.is_dir() and any(work_entries(work)), what="the input to be claimed")
    _code, doc = status_json(h)
    [inbox] = doc["inboxes"]
    assert inbox["unowned_work_files"] == [] and not any(".nbank" in d for d in doc["degraded"])
    go.touch()
    h.wait_settled(1)


def test_a_work_folder_replaced_by_a_link_loop_is_reported_not_a_crash(
    daemon_factory: Any,
) -> None:
    """A .nbank replaced by a symlink loop leaves status answering, degraded, saying
    it is a link, instead of failing the command."""
    h: DaemonHarness = daemon_factory()
    h.start()
    shutil.rmtree(h.inbox / ".nbank")  # holds only the token at start; replaced while it runs
    (h.inbox / ".nbank").symlink_to(".nbank")
    code, doc = status_json(h)
    assert code == 1 and doc["inboxes"][0]["unowned_work_files"] == []
    # (the inbox's own check may say "... is a link or not a folder" too, once it ran)
    [line] = [d for d in doc["degraded"] if "is a link, not the inbox's work folder" in d]
    assert ".nbank" in line


def test_a_work_folder_that_cannot_be_listed_is_a_problem_with_what_to_check(
    tmp_path: Path,
) -> None:
    """check() turns a work folder it cannot open (here a path too long) into a status
    line saying what to check, never an error."""
    journal = Journal(tmp_path / "journal.sqlite3")
    names, problem = check(tmp_path / ("x" * 5000), journal.known_tokens)
    assert names == [] and problem is not None
    assert "cannot list" in problem and "check its owner and mode" in problem


def test_a_work_folder_that_is_not_a_folder_stops_the_start_with_a_clear_message(
    daemon_factory: Any,
) -> None:
    """.nbank existing as a file: nbankd refuses to start, naming it and what to do, and
    leaves the file alone (no traceback)."""
    h: DaemonHarness = daemon_factory()
    h.inbox.mkdir(parents=True, exist_ok=True)
    (h.inbox / ".nbank").write_bytes(b"someone's file")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("nbankd")), "-c", str(h.write_config())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{h.inbox / '.nbank'} exists but is not a folder" in proc.stderr
    assert "move it away" in proc.stderr
    assert (h.inbox / ".nbank").read_bytes() == b"someone's file"


def test_a_work_folder_that_is_a_link_is_never_listed(tmp_path: Path) -> None:
    """unowned_work_files refuses a work folder that is a symbolic link (its target's
    files are never taken for claimed inputs); check() says it is a link."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / T2).write_bytes(b"not a claimed input")
    work = tmp_path / ".nbank"
    work.symlink_to(target)
    journal = Journal(tmp_path / "journal.sqlite3")
    with pytest.raises(WorkFolderIsLink):
        unowned_work_files(work, journal.known_tokens)
    names, problem = check(work, journal.known_tokens)
    assert names == [] and problem is not None and "is a link" in problem
