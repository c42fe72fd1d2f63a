"""Two inputs for one identifier, driven step by step (hostile round D).

The deposit steps run directly against a temporary archive, an embedded registry and
a journal, so each interleaving of two inputs is exact: both looked up before either
registers, a collision injected between two steps, a re-drop after a deposit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import pytest

from fixtures.steps_env import Env
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.names import WORK_DIR_NAME


def _reason(item: Item) -> dict[str, str]:
    return json.loads(item.reason_json or "{}")


def test_same_bytes_two_extensions_in_one_burst_give_one_file(env: Env) -> None:
    """b.wav and b.bin with the same bytes, both looked up before either registers:
    one record, one file in resources/b/, the other rejected duplicate naming it."""
    data = os.urandom(4096)
    wav, bin_ = env.drop("b.wav", data), env.drop("b.bin", data)
    wav, bin_ = env.until(wav, State.CHECKED), env.until(bin_, State.CHECKED)
    wav, bin_ = env.until(wav, State.DONE), env.until(bin_, State.REJECTED)
    assert env.stored() == ["b/b.wav"]
    assert [r.name for r in env.registry.search(sha1=hashlib.sha1(data).hexdigest())] == ["b"]
    reason = _reason(bin_)
    assert reason["code"] == "duplicate"
    assert str(env.archive.resources_dir / "b" / "b.wav") in reason["message"]
    assert (env.inbox / "rejected" / "b.bin").read_bytes() == data


def test_same_bytes_other_extension_later_is_rejected_naming_the_file(env: Env) -> None:
    """After b.wav is deposited, b.bin with the same bytes is rejected duplicate at
    lookup, naming resources/b/b.wav (no publish/restage loop)."""
    data = os.urandom(4096)
    env.until(env.drop("b.wav", data), State.DONE)
    item = env.until(env.drop("b.bin", data), State.REJECTED)
    reason = _reason(item)
    assert reason["code"] == "duplicate"
    assert str(env.archive.resources_dir / "b" / "b.wav") in reason["message"]
    assert item.url is None and env.stored() == ["b/b.wav"]


def test_same_identifier_other_bytes_is_name_taken(env: Env) -> None:
    """rec.wav deposited, then another rec.wav with other bytes: name-taken."""
    env.until(env.drop("rec.wav", b"first take"), State.DONE)
    item = env.until(env.drop("rec.wav", b"second take"), State.REJECTED)
    assert _reason(item)["code"] == "name-taken"
    assert env.stored() == ["re/rec.wav"]
    assert (env.archive.resources_dir / "re" / "rec.wav").read_bytes() == b"first take"


def test_another_identifier_same_bytes_is_duplicate_at_lookup(env: Env) -> None:
    """x.wav deposited; y.wav with the same bytes is rejected duplicate naming x."""
    env.until(env.drop("x.wav", b"same bytes"), State.DONE)
    reason = _reason(env.until(env.drop("y.wav", b"same bytes"), State.REJECTED))
    assert reason["code"] == "duplicate" and "registered as x" in reason["message"]


def test_another_identifier_same_bytes_at_register_is_duplicate(env: Env) -> None:
    """x.wav and y.wav with the same bytes, both looked up first: the loser's refusal
    by the registry (SHA-1 taken) is reported as duplicate naming x, never sha1-taken."""
    x, y = env.drop("x.wav", b"same bytes"), env.drop("y.wav", b"same bytes")
    x, y = env.until(x, State.CHECKED), env.until(y, State.CHECKED)
    env.until(x, State.DONE)
    reason = _reason(env.until(y, State.REJECTED))
    assert reason["code"] == "duplicate" and "registered as x" in reason["message"]


def test_a_duplicate_of_a_record_whose_file_is_missing_is_kept_and_said_so(env: Env) -> None:
    """y.wav has the bytes of record x, which lists this archive but has no file there:
    rejected duplicate saying y may be the only copy (kept, never advised deleted)."""
    data = os.urandom(4096)
    env.registry.add_resource(
        dtype=env.spec.config.dtype,
        archive=env.spec.archive_name,
        name="x",
        sha1=hashlib.sha1(data).hexdigest(),
        metadata={},
    )
    reason = _reason(env.until(env.drop("y.wav", data), State.REJECTED))
    assert reason["code"] == "duplicate" and "stores no copy of x" in reason["message"]
    assert "keep this file" in reason["hint"] and "delete" not in reason["hint"]
    assert (env.inbox / "rejected" / "y.wav").read_bytes() == data
    assert env.stored() == []


def test_a_duplicate_of_a_stored_record_says_the_stored_copy_serves(env: Env) -> None:
    """y.wav has the bytes of x, stored in this archive: the hint says it may be deleted
    once checked (x's copy serves)."""
    env.until(env.drop("x.wav", b"same bytes"), State.DONE)
    reason = _reason(env.until(env.drop("y.wav", b"same bytes"), State.REJECTED))
    assert "stores no copy" not in reason["message"]
    assert "delete this copy once you have checked it" in reason["hint"]


def test_redrop_of_same_name_and_bytes_is_already_deposited(env: Env) -> None:
    """The same file dropped again: no new record or file, the input removed, and a
    receipt marked already-deposited naming the record."""
    data = os.urandom(2048)
    env.until(env.drop("take.dat", data), State.DONE)
    item = env.until(env.drop("take.dat", data), State.DONE)
    assert item.already
    assert env.stored() == ["ta/take.dat"]
    assert not (env.inbox / "take.dat").exists()
    assert not list((env.inbox / WORK_DIR_NAME).iterdir())
    receipts = [
        json.loads(line)
        for line in next((env.root / "receipts").glob("*.jsonl")).read_text().splitlines()
    ]
    assert [r["outcome"] for r in receipts] == ["deposited", "already-deposited"]
    assert receipts[1]["id"] == "take" and receipts[1]["url"] == receipts[0]["url"]


def test_redrop_over_a_damaged_stored_copy_is_kept(env: Env) -> None:
    """Re-dropped over a stored copy whose bytes no longer match the record: the input
    is rejected stored-damaged (kept as the good copy), never removed as a success."""
    env.until(env.drop("keep.dat", b"good bytes"), State.DONE)
    stored = env.archive.resources_dir / "ke" / "keep.dat"
    stored.chmod(0o644)
    stored.write_bytes(b"bad! bytes")
    item = env.until(env.drop("keep.dat", b"good bytes"), State.REJECTED)
    assert _reason(item)["code"] == "stored-damaged"
    assert (env.inbox / "rejected" / "keep.dat").read_bytes() == b"good bytes"


def test_one_character_identifier_is_filed_under_its_identifier(env: Env) -> None:
    """a.json is stored in resources/a/ (where nbank looks), not resources/a./."""
    env.until(env.drop("a.json", b"{}\n"), State.DONE)
    assert env.stored() == ["a/a.json"]
    assert env.archive.stored_path("a") == env.archive.resources_dir / "a" / "a.json"


def test_one_character_identifier_checks_the_other_stub(env: Env) -> None:
    """A copy nbank 0.13 filed in resources/a./ holds the identifier: a.dat with other
    bytes is name-taken, never a second file in resources/a/."""
    env.until(env.drop("a.dat", b"one"), State.DONE)
    legacy = env.archive.resources_dir / "a."
    legacy.mkdir()
    os.rename(env.archive.resources_dir / "a" / "a.dat", legacy / "a.dat")
    item = env.until(env.drop("a.bin", b"one"), State.REJECTED)
    assert _reason(item)["code"] == "duplicate"
    assert str(legacy / "a.dat") in _reason(item)["message"]
    assert env.stored() == ["a./a.dat"]


def _auto_env(env: Env) -> Env:
    spec = replace(env.spec, config=replace(env.spec.config, auto_id=True))
    env.spec = spec
    env.steps.inboxes = lambda key: spec if key == spec.key else None
    return env


def test_taken_automatic_identifier_is_replaced(env: Env) -> None:
    """An automatic identifier registered by someone else between claim and lookup is
    replaced by a new journaled one; the input is deposited, never rejected."""
    env = _auto_env(env)
    item = env.until(env.drop("auto.wav", b"auto bytes"), State.STAGED)
    taken = item.name
    assert taken is not None and item.auto_id
    env.registry.add_resource(dtype="test-file", archive="arch", name=taken, sha1="0" * 40)
    item = env.until(item, State.DONE)
    assert item.name != taken and item.target_name == f"{item.name}.wav"
    assert env.journal.get(item.id) == item
    stored = env.archive.stored_file(item.name, item.target_name)
    assert stored.read_bytes() == b"auto bytes"
    record = env.registry.get_resource(item.name)
    assert record is not None and record.sha1 == hashlib.sha1(b"auto bytes").hexdigest()


def test_automatic_identifier_stored_unregistered_is_replaced(env: Env) -> None:
    """An automatic identifier whose name a stray stored file holds is replaced."""
    env = _auto_env(env)
    item = env.until(env.drop("auto.wav", b"auto bytes 2"), State.STAGED)
    assert item.name is not None
    stray = env.archive.stored_file(item.name, f"{item.name}.dat")
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"stray")
    done = env.until(item, State.DONE)
    assert done.name != item.name and stray.read_bytes() == b"stray"


def test_automatic_identifier_taken_at_register_is_replaced(env: Env) -> None:
    """Taken between lookup and register (the registry refuses the name): replaced."""
    env = _auto_env(env)
    item = env.until(env.drop("auto.wav", b"auto bytes 3"), State.CHECKED)
    assert item.name is not None
    env.registry.add_resource(dtype="test-file", archive="arch", name=item.name, sha1="1" * 40)
    done = env.until(item, State.DONE)
    assert done.name != item.name and done.state is State.DONE


def test_already_deposited_input_is_kept_when_the_stored_copy_goes_bad(env: Env) -> None:
    """Found already deposited, then the stored copy goes bad before the input is
    removed: the read-back catches it and the input stays (never a success)."""
    env.until(env.drop("late.dat", b"good bytes"), State.DONE)
    item = env.until(env.drop("late.dat", b"good bytes"), State.CHECKED)
    assert item.already
    stored = env.archive.resources_dir / "la" / "late.dat"
    stored.chmod(0o644)
    stored.write_bytes(b"bad! bytes")
    for _ in range(8):
        item = env.step(replace(item, not_before=0.0), _next(item))
    assert item.state not in (State.DONE, State.REJECTED) and not item.already
    assert item.error_code == "stored-damaged"
    assert (env.inbox / WORK_DIR_NAME / item.token).read_bytes() == b"good bytes"


def _next(item: Item) -> Step:
    from nbankd.deposit.lifecycle import next_step

    step = next_step(replace(item, not_before=0.0).progress, 0.0)
    assert step is not None
    return step


def test_registered_item_published_by_an_older_nbankd_is_moved_not_rejected(env: Env) -> None:
    """An item linked into resources/a./ by an older nbankd (one-character identifier,
    crash before the journal) finishes: its copy is moved to resources/a/."""
    item = env.until(env.drop("a.json", b"[1]\n"), State.REGISTERED)
    staged = env.archive.staging_dir / env.steps.staged_name(item)
    legacy = env.archive.resources_dir / "a." / "a.json"
    legacy.parent.mkdir()
    os.link(staged, legacy)
    item = env.until(item, State.DONE)
    assert env.stored() == ["a/a.json"]
    assert (env.archive.resources_dir / "a" / "a.json").read_bytes() == b"[1]\n"


def test_same_bytes_other_description_waits_for_the_record_holder(env: Env) -> None:
    """b.wav and b.bin (same bytes, other metadata) looked up together: the one the
    registry refuses does not take the other's record as its own; it looks again once
    the other is stored and is rejected duplicate, so the record describes the file."""
    data = os.urandom(1000)
    wav = env.until(env.drop("b.wav", data), State.STAGED)
    rig2 = replace(env.spec, config=replace(env.spec.config, metadata={"rig": "2"}))
    env.steps.inboxes = lambda key: rig2
    bin_ = env.until(env.drop("b.bin", data), State.STAGED)
    env.steps.inboxes = lambda key: env.spec
    wav, bin_ = env.until(wav, State.CHECKED), env.until(bin_, State.CHECKED)
    wav = env.until(wav, State.REGISTERED)
    bin_ = env.step(bin_, Step.REGISTER)
    assert (bin_.state, bin_.error_code, bin_.url) == (State.STAGED, "identifier-busy", None)
    env.until(wav, State.DONE)
    bin_ = env.until(replace(bin_, not_before=0.0), State.REJECTED)
    assert _reason(bin_)["code"] == "duplicate"
    record = env.registry.get_resource("b")
    assert record is not None and record.metadata == {} and env.stored() == ["b/b.wav"]


def test_same_name_and_bytes_from_two_folders_in_one_burst(env: Env) -> None:
    """sub1/take.dat and sub2/take.dat (same bytes), both looked up before either is
    stored: one file and one record, and the second receipt is already-deposited."""
    data = os.urandom(3000)
    (env.inbox / "sub1").mkdir()
    (env.inbox / "sub2").mkdir()
    first, second = env.drop("sub1/take.dat", data), env.drop("sub2/take.dat", data)
    first, second = env.until(first, State.CHECKED), env.until(second, State.CHECKED)
    first, second = env.until(first, State.DONE), env.until(second, State.DONE)
    assert (first.already, second.already) == (False, True)
    assert env.stored() == ["ta/take.dat"]
    receipts = [
        json.loads(line)
        for line in next((env.root / "receipts").glob("*.jsonl")).read_text().splitlines()
    ]
    assert sorted(r["outcome"] for r in receipts) == ["already-deposited", "deposited"]


def test_a_location_added_meanwhile_at_register_is_not_a_rejection(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process locates the record in this archive between the register step's
    read of the record and its own location request: the input is deposited (the
    registry locates it once), never rejected."""
    data = os.urandom(2048)
    env.until(env.drop("race.dat", data), State.DONE)
    env.registry.remove_location("race", env.spec.archive_name)  # located nowhere here
    item = env.until(env.drop("race.dat", data), State.CHECKED)
    assert item.already
    real = env.registry.add_location

    def concurrent_first(name: str, archive: str, key: str | None = None) -> object:
        real(name, archive, key)  # the other process's request wins the race
        return real(name, archive, key)

    monkeypatch.setattr(env.registry, "add_location", concurrent_first)
    item = env.step(item, Step.REGISTER)
    assert item.state is State.REGISTERED, (item.error_code, item.error_message)
    monkeypatch.undo()
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and item.already
    locations = [loc.archive_name for loc in env.registry.get_locations("race")]
    assert locations.count(env.spec.archive_name) == 1
