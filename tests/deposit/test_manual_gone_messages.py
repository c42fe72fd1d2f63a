"""What ``nbankctl deposit`` tells of a file gone from its folder before the deposit
took it (another person's deposit stored it first), and of a work folder removed
under it: never that the file is still there, never to restart nbankd."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from fixtures.manual_env import ManualFiles, manual_folder
from fixtures.steps_env import Env, env
from nbankctl.deposit_output import report_outcomes
from nbankctl.report import Report
from nbankd.deposit import manual
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State
from nbankd.names import WORK_DIR_NAME

__all__ = ["env"]


@pytest.fixture
def files(env: Env) -> Iterator[ManualFiles]:
    with manual_folder(env) as made:
        yield made


def journaled(env: Env, files: ManualFiles, name: str) -> Item:
    inbox, _spec, folder = files
    (folder / name).write_bytes(b"recorded bytes")
    [item], refused = manual.journal_files(env.journal, inbox, [name], kind="file", now=0.0)
    assert refused == []
    return item


def told(item: Item, capsys: pytest.CaptureFixture[str]) -> str:
    """What nbankctl deposit says on stderr of ``item``, as it ended."""
    args = argparse.Namespace(json_out=False, json=False)
    report_outcomes(args, Report(), [manual.describe(item)])
    return capsys.readouterr().err


def test_a_work_folder_removed_under_a_manual_deposit_never_hints_a_restart_of_nbankd(
    env: Env, files: ManualFiles
) -> None:
    """The work folder removed before the claim: the item waits, and its hint tells
    that the deposit's next try makes a new one (there is no nbankd to restart)."""
    item = journaled(env, files, "rec.dat")
    (files[2] / WORK_DIR_NAME).rmdir()
    item = env.steps.drive(item)
    assert item.state is State.CLAIMING and item.error_code == "inbox-tampered", item
    hint = manual.describe(item)["record"]["hint"]
    assert "restart nbankd" not in hint and "next `nbankctl deposit`" in hint, hint


def test_a_waiting_file_gone_from_its_folder_is_not_said_to_be_still_there(
    env: Env, files: ManualFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file waiting for its claim and gone from its folder meanwhile is told gone,
    maybe stored by another deposit, with the search that finds it."""
    item = journaled(env, files, "rec.dat")
    (files[2] / WORK_DIR_NAME).rmdir()
    item = env.steps.drive(item)
    (files[2] / "rec.dat").unlink()  # another person's deposit took it
    said = told(item, capsys)
    assert "still there" not in said and "`nbankctl search rec`" in said, said


def test_a_file_another_deposit_took_first_points_to_the_search_that_finds_it(
    env: Env, files: ManualFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file gone before its claim (another person's deposit of it won): not
    deposited, and the message says it may have been stored by another deposit."""
    item = journaled(env, files, "rec.dat")
    (files[2] / "rec.dat").unlink()
    item = env.steps.drive(item)
    assert item.state is State.CANCELLED, item
    said = told(item, capsys)
    assert "vanished" in said and "`nbankctl search rec`" in said, said


def test_a_waiting_file_still_in_its_folder_is_said_to_be_there(
    env: Env, files: ManualFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file waiting for its claim and still in its folder is told still there."""
    item = journaled(env, files, "rec.dat")
    (files[2] / WORK_DIR_NAME).rmdir()
    item = env.steps.drive(item)
    assert "it is still there" in told(item, capsys)


def test_the_hint_of_a_daemon_inbox_work_folder_removed_still_names_its_restart(
    env: Env,
) -> None:
    """A daemon inbox's work folder removed: its hint still says to restart nbankd
    (which makes a new one), as before."""
    item = env.drop("rec.dat", b"recorded bytes")
    (env.inbox / WORK_DIR_NAME).rmdir()
    item = env.steps.drive(item)
    assert item.error_code == "inbox-tampered" and "restart nbankd" in (item.error_hint or "")
