"""An item's copies and its journal row (nbankd/deposit/item.py)."""

from __future__ import annotations

import dataclasses

import pytest

from fixtures.items import ITEM as BASE
from nbankd.deposit.item import SAVED_FIELDS, row_of
from nbankd.deposit.lifecycle import Progress, State

ITEM = dataclasses.replace(BASE, id=7, relpath=b"rec.wav", state=State.CLAIMED)


def test_with_progress_is_the_copy_replace_would_make() -> None:
    """Progress and other changes in one copy, equal to dataclasses.replace's."""
    p = Progress(State.STAGED, attempts=2, not_before=9.0, error_code="x", error_message="m")
    got = ITEM.with_progress(p, updated=5.0, sha1="0" * 40)
    want = dataclasses.replace(
        ITEM,
        state=State.STAGED,
        attempts=2,
        not_before=9.0,
        error_code="x",
        error_message="m",
        updated=5.0,
        sha1="0" * 40,
    )
    assert got == want and hash(got) == hash(want) and ITEM.state is State.CLAIMED


def test_changed_is_the_copy_replace_would_make() -> None:
    """A copy with the changes, equal to dataclasses.replace's; the original unchanged."""
    got = ITEM.changed(name="rec", already=True)
    assert got == dataclasses.replace(ITEM, name="rec", already=True)
    assert (ITEM.name, ITEM.already) == (None, False)


@pytest.mark.parametrize("copy", ["changed", "with_progress"])
def test_a_field_items_do_not_have_is_refused(copy: str) -> None:
    """A misspelt change is an error, never a silent extra attribute."""
    with pytest.raises(TypeError, match="shaa1"):
        if copy == "changed":
            ITEM.changed(shaa1="0" * 40)
        else:
            ITEM.with_progress(ITEM.progress, shaa1="0" * 40)


def test_a_row_holds_states_as_text_flags_as_numbers_and_the_id_last() -> None:
    """The journal's row: every saved field in order, converted, then the id."""
    item = dataclasses.replace(ITEM, error_message="bad \udcff name", already=True)
    row = row_of(item)
    fields = dict(zip(SAVED_FIELDS, row[:-1], strict=True))
    assert row[-1] == 7 and len(row) == len(SAVED_FIELDS) + 1
    assert fields["state"] == "claimed" and fields["verify"] == 1 and fields["already"] == 1
    assert fields["zipped"] == 0 and fields["relpath"] == b"rec.wav"
    fields["error_message"].encode("utf-8")  # valid UTF-8 whatever the file name was
