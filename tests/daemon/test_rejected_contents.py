"""What a rejected folder holds, as status counts it: every entry but nbankd's own
bookkeeping, and the folders it could not list (never taken for empty)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nbankd.daemon.rejected_listing import WALK_DEPTH
from nbankd.daemon.requeue import rejected_contents
from nbankd.deposit.rejection import reason_name


class _Inbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rejected_dir = "rejected"
        self.rejected_dirs = ("rejected",)
        self.ready = "settle"


def test_every_entry_but_bookkeeping_is_counted(tmp_path: Path) -> None:
    """Every entry of a rejected folder counts but nbankd's own (reasons, probes, a
    rejected input's sidecar and marker), with or without its reason file."""
    inbox: Any = _Inbox(tmp_path)
    rejected = tmp_path / "rejected"
    (rejected / "sub" / "folder input").mkdir(parents=True)
    (rejected / "sub" / "folder input" / "a.wav").write_text("inside a folder input")
    (rejected / "sub" / "folder input.reason").write_text("{}")
    for name in ("a.wav", "a.wav.reason", "a.wav.nbank.yaml", "b.wav", "b.wav.nbank.json"):
        (rejected / name).write_text(name)
    (rejected / ".c.wav.reason.tmp").write_text("{}")  # a reason being written
    (rejected / "gone.wav.reason").write_text("{}")  # its input removed: nothing waits
    (rejected / "stray.nbank.yaml").write_text("a sidecar whose input is gone")
    (rejected / "empty").mkdir()
    os.symlink("/", rejected / "link")
    found = rejected_contents(inbox)
    assert found.inputs == (rejected / "a.wav", rejected / "sub" / "folder input")
    assert found.unexplained == (  # a link is an entry, in name order, never followed
        rejected / "b.wav",
        rejected / "link",
        rejected / "stray.nbank.yaml",
    )
    assert found.unreadable == ()


def test_a_rejected_folder_not_there_holds_nothing(tmp_path: Path) -> None:
    """No rejected folder: nothing held, nothing unreadable."""
    found = rejected_contents(_Inbox(tmp_path))  # type: ignore[arg-type]
    assert found.entries == () and found.unreadable == ()


def test_a_planted_reason_counts_no_file_outside_the_rejected_folder(tmp_path: Path) -> None:
    """A ``.reason`` whose name is no input's, planted in the rejected folder with a
    ``rejected_path`` naming a file elsewhere, does not count (nor name) that file: a
    shortened reason name stands only for the input its name was made from."""
    inbox: Any = _Inbox(tmp_path / "inbox")
    rejected = tmp_path / "inbox" / "rejected"
    rejected.mkdir(parents=True)
    secret = tmp_path / "private" / "grant.docx"
    secret.parent.mkdir()
    secret.write_text("not the inbox writer's")
    (rejected / "planted.reason").write_text(json.dumps({"rejected_path": str(secret)}))
    long_name = "x" * 250 + ".wav"
    (rejected / long_name).write_text("rejected with a shortened reason name")
    shortened = os.fsdecode(reason_name(long_name.encode()))
    (rejected / shortened).write_text(json.dumps({"rejected_path": str(rejected / long_name)}))
    found = rejected_contents(inbox)
    assert found.inputs == (rejected / long_name,)
    assert found.unexplained == ()


def test_a_link_in_place_of_the_rejected_folder_is_told_never_followed(tmp_path: Path) -> None:
    """A link where the rejected folder should be is told as a link; what it points to
    (here a folder holding a rejected input and its reason) is not counted."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.wav").write_text("not in the inbox")
    (elsewhere / "a.wav.reason").write_text("{}")
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "rejected").symlink_to(elsewhere)
    found = rejected_contents(_Inbox(tmp_path / "inbox"))  # type: ignore[arg-type]
    assert found.entries == () and found.unreadable == ()
    assert found.not_folders == ((tmp_path / "inbox" / "rejected", "symbolic link"),)


def test_a_reason_naming_an_input_elsewhere_explains_nothing(tmp_path: Path) -> None:
    """A reason with no input beside it whose ``rejected_path`` names a file outside
    its folder makes no rejected input of that file."""
    rejected = tmp_path / "rejected"
    rejected.mkdir()
    (tmp_path / "private.txt").write_text("someone else's")
    forged = f'{{"rejected_path": "{tmp_path / "private.txt"}"}}'
    (rejected / "x.wav.reason").write_text(forged)
    found = rejected_contents(_Inbox(tmp_path))  # type: ignore[arg-type]
    assert found.entries == () and found.unreadable == ()


def test_folders_past_the_depth_bound_are_told_not_counted(tmp_path: Path) -> None:
    """Folders nested past WALK_DEPTH levels are told as not looked in, and what lies
    above them is still counted."""
    rejected = tmp_path / "rejected"
    deep = rejected.joinpath(*["d"] * (WALK_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "far.wav").write_text("too deep to be looked at")
    (rejected / "near.wav").write_text("counted")
    found = rejected_contents(_Inbox(tmp_path))  # type: ignore[arg-type]
    assert found.unexplained == (rejected / "near.wav",)
    assert [p for p, _ in found.unreadable] == [rejected.joinpath(*["d"] * WALK_DEPTH)]
