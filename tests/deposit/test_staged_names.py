"""The staged copies of a deposit in staging/: named by archive/layout, under either form."""

from __future__ import annotations

from dataclasses import replace

from fixtures.steps_env import Env
from nbankd.archive import layout
from nbankd.deposit.lifecycle import State, Step


def test_stage_removes_its_own_leftovers_of_both_forms(env: Env) -> None:
    """Staging again removes this item's earlier copies (an older release's name and
    another process's), keeps another item's, and names its copy with its instance."""
    item = env.step(env.drop("rec.dat", b"bytes"), Step.CLAIM)
    staging = env.archive.staging_dir
    older = staging / layout.staged_name(item.token)
    crashed = staging / layout.staged_name(item.token, "deadbeef")
    another = staging / layout.staged_name("f" * 32, "deadbeef")
    for path in (older, crashed, another):
        path.write_bytes(b"left")
    item = env.step(item, Step.STAGE)
    assert item.state is State.STAGED
    names = sorted(p.name for p in staging.iterdir())
    assert names == sorted([another.name, layout.staged_name(item.token, env.steps.instance)])
    assert env.steps.staged_name(item) == layout.staged_name(item.token, env.steps.instance)


def test_an_older_journals_item_finds_its_staged_copy(env: Env) -> None:
    """An item journaled without a staged identity (an older release) publishes the
    copy staged under the name every process used then, .nbankd-TOKEN."""
    item = env.until(env.drop("rec.dat", b"bytes"), State.REGISTERED)
    staged = env.archive.staging_dir / env.steps.staged_name(item)
    older = env.archive.staging_dir / layout.staged_name(item.token)
    staged.rename(older)
    item = env.journal.save(replace(item, staged_identity=None))
    assert env.steps.staged_name(item) == older.name
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and env.stored() == ["re/rec.dat"]
    assert not older.exists()
