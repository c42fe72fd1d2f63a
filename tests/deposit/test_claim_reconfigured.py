"""The claim of an input whose inbox was reconfigured since its intent was journaled:
left in the inbox to be decided again, never deposited under a mix of two
configurations (hostile review of reloads, 2026-12-07)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import Kind, Step


def _reconfigure(env: Env, **changes: object) -> None:
    """The live inbox as a reload left it (``changes`` to the spec, or ``config=``)."""
    spec = replace(env.spec, **changes)  # type: ignore[arg-type]
    env.steps.inboxes = lambda key: spec if key == spec.key else None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"archive_name": "elsewhere"}, "archive"),
        ({"archive_path": Path("/srv/other-archive")}, "archive"),
    ],
)
def test_an_input_journaled_before_a_reload_is_left_to_be_decided_again(
    env: Env, change: dict[str, object], named: str
) -> None:
    """A reload between an input's journaling and its claim that changed its archive
    leaves the input untouched in the inbox (cancelled, to be journaled again), naming
    what changed."""
    item = env.drop("rec.dat", b"recorded")
    _reconfigure(env, **change)
    item, outcome = env.steps.run(item, Step.CLAIM)
    assert (outcome.kind, outcome.code) == (Kind.GONE, "reconfigured"), outcome
    assert named in outcome.message
    assert (env.inbox / "rec.dat").read_bytes() == b"recorded"


def test_a_folder_journaled_as_one_input_is_decided_again_in_files_mode(env: Env) -> None:
    """A folder journaled as one input (folder mode) is left alone when the inbox now
    takes files one by one."""
    (env.inbox / "session").mkdir()
    (env.inbox / "session" / "a.dat").write_bytes(b"a")
    item = env.journal_existing("session").changed(kind="dir")
    item, outcome = env.steps.run(env.journal.save(item), Step.CLAIM)
    assert (outcome.kind, outcome.code) == (Kind.GONE, "reconfigured"), outcome
    assert (env.inbox / "session" / "a.dat").exists()


def test_a_top_level_file_of_a_folder_mode_inbox_is_claimed(env: Env) -> None:
    """A file at the top of an inbox that takes folders as inputs is claimed as a file:
    folder mode is no reconfiguration for it."""
    _reconfigure(env, config=replace(env.spec.config, directories="resources"))
    item = env.drop("rec.dat", b"recorded")
    item, outcome = env.steps.run(item, Step.CLAIM)
    assert outcome.kind == Kind.OK, outcome


def test_a_changed_placement_is_no_reconfiguration(env: Env) -> None:
    """Placement and verify (how an input is copied) stay as journaled: an input
    journaled before a reload that changed them is claimed."""
    item = env.drop("rec.dat", b"recorded")
    _reconfigure(env, placement="rename", verify=False)
    item, outcome = env.steps.run(item, Step.CLAIM)
    assert outcome.kind == Kind.OK, outcome
