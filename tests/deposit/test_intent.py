"""The intent the journal fixed for an item, and the steps following it over a reload."""

from __future__ import annotations

from dataclasses import replace

from fixtures.steps_env import Env
from nbankd.archive import layout, opening
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.receipts import read_receipts
from nbankd.deposit.spec import Intent


def test_intent_reads_what_the_journal_fixed(env: Env) -> None:
    """An intent is the item's journal row: inbox, path, archive, placement, verify."""
    item = env.drop("rec.dat", b"bytes")
    intent = Intent.of(item)
    assert (intent.inbox, intent.relpath) == (env.spec.key, b"rec.dat")
    assert (intent.archive_name, intent.archive_path) == ("arch", env.archive.path)
    assert (intent.placement, intent.verify) == ("copy", True)
    assert intent.identifier is None and intent.target is None


def test_intent_after_claim_names_the_target(env: Env) -> None:
    """After claim the intent holds the identifier, datatype, metadata and target path."""
    item = env.step(env.drop("rec.dat", b"bytes"), Step.CLAIM)
    intent = Intent.of(item)
    assert (intent.identifier, intent.dtype) == ("rec", "test-file")
    assert intent.metadata_json == item.metadata_json
    assert intent.target == layout.stored_file(env.archive.path, "rec", "rec.dat")


def test_fix_lays_the_intent_over_a_live_spec(env: Env) -> None:
    """A spec seen through an intent has the journaled archive, placement and verify."""
    item = env.drop("rec.dat", b"bytes")
    live = replace(env.spec, archive_name="b", archive_path=env.root / "b", verify=False)
    fixed = Intent.of(item).fix(replace(live, placement="rename"))
    assert (fixed.archive_name, fixed.archive_path) == ("arch", env.archive.path)
    assert (fixed.placement, fixed.verify) == ("copy", True)
    assert fixed.config is env.spec.config  # the live rest is kept


def test_steps_follow_the_intent_not_a_reloaded_inbox(env: Env) -> None:
    """An inbox re-pointed at another archive (renaming, no verify) while an input is
    registered leaves it stored, by copy, in the archive its intent names."""
    item = env.until(env.drop("rec.dat", b"bytes"), State.REGISTERED)
    other = opening.create_archive(env.root / "b", env.registry.url)
    moved = replace(
        env.spec, archive_name="b", archive_path=other.path, placement="rename", verify=False
    )
    env.steps.inboxes = lambda key: moved if key == env.spec.key else None
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and env.stored() == ["re/rec.dat"]
    assert not any(other.resources_dir.rglob("*")) and not any(other.staging_dir.iterdir())
    (receipt,) = read_receipts(env.root / "receipts")
    assert receipt["archive"] == "arch"
    assert receipt["archive_path"] == str(env.archive.path / "resources" / "re" / "rec.dat")
