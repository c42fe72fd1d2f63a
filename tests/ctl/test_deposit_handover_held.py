"""nbankctl deposit handing files to a running daemon first looks, as its user, for
its own processes holding them open for writing: the daemon (another user, its /proc
hidden) cannot see them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fixtures.holders import held_open
from nbankctl.deposit_cmds import _not_held
from nbankctl.report import Report


def test_files_and_folders_held_open_are_refused_before_the_hand_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file held open for writing, and a folder holding one, are refused and named
    (-j records, a failure counted); the closed ones are handed over."""
    busy, done, session = tmp_path / "busy.dat", tmp_path / "done.dat", tmp_path / "session"
    busy.write_bytes(b"recording")
    done.write_bytes(b"recorded")
    (session / "a").mkdir(parents=True)
    (session / "a" / "take.dat").write_bytes(b"recording")
    (session / "quiet.dat").write_bytes(b"recorded")
    args = argparse.Namespace(json=True, json_out=False)
    report = Report()
    with held_open(busy), held_open(session / "a" / "take.dat"):
        kept = _not_held(args, report, [busy, done, session])
    assert kept == [str(done)]
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in records] == [str(busy), str(session)]
    assert records[1]["error"].startswith("holds a file still open for writing")
    assert report.exit_code == 1
