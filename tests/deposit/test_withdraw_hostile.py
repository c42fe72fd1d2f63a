"""Hostile review of withdrawn in-place deposits: ``placement: rename``, an input that
changed after registering is put back by publish, its record left as it is (a first
version also removed the record's location in the archive: these tests showed why it
must not); one whose bytes did not change is published."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fixtures.django_server import DjangoServer, unique_name
from fixtures.inplace_env import FolderEnv
from fixtures.seam_hooks import Crash, crash_at
from fixtures.steps_env import Env, env_on
from nbankd import errors
from nbankd.archive import opening
from nbankd.deposit import release
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import (
    FINAL,
    Outcome,
    Progress,
    State,
    Step,
    advance,
    next_step,
)
from nbankd.deposit.rounds import run_round
from nbankd.hashing import CopyResult, SourceReadError
from nbankd.registry.http import HttpRegistry


def _work(env: Env, item: Item) -> Path:
    return env.inbox / ".nbank" / item.token


def _append(path: Path, data: bytes = b"written after registration") -> None:
    with open(path, "ab") as writer:
        writer.write(data)


def _locations(env: Env, name: str | None) -> tuple[str, ...]:
    assert name is not None
    record = env.registry.get_resource(name)
    assert record is not None
    return tuple(record.locations)


# -- another input relies on the location ----------------------------------------------


def test_a_changed_second_input_never_unlocates_the_record_the_first_ones_copy_serves(
    env: Env,
) -> None:
    """Two inputs with one name and the same bytes (dropped twice, or two daemons), both
    registered under the one record: the second changes and withdraws the location
    before the first publishes; once the first is deposited the record must still list
    the archive that holds its copy."""
    data = os.urandom(20_000)
    first = env.until(env.drop("twice.dat", data, placement="rename"), State.CLAIMED)
    second = env.until(env.drop("twice.dat", data, placement="rename"), State.CLAIMED)
    first = env.until(first, State.REGISTERED)
    second = env.until(second, State.REGISTERED)  # NameTaken, same SHA-1: "ours", proceeds
    assert second.progress.registered and second.name == first.name
    _append(_work(env, second))
    second = env.step(second, Step.PUBLISH)
    assert second.state is State.RETURNING  # it withdrew the location of the shared record
    first = env.until(first, State.DONE)
    assert first.state is State.DONE
    assert env.stored() == [f"{first.name[:2]}/{first.target_name}"]
    assert _locations(env, first.name) == ("arch",), (
        "the archive holds the record's bytes, the registry says it does not"
    )


# -- false "changed" --------------------------------------------------------------------


def test_an_input_only_touched_with_an_automatic_identifier_is_published(env: Env) -> None:
    """With automatic identifiers, an input whose mtime alone moved after registering
    (bytes intact) is published under its record, never put back (deposited again, it
    would be refused as a duplicate of the record no copy holds)."""
    env = env.auto_ids()
    data = os.urandom(12_000)
    item = env.until(env.drop("touched.wav", data, placement="rename"), State.REGISTERED)
    work = _work(env, item)
    st_ = os.stat(work)
    os.utime(work, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))  # touch
    item = env.until(item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    assert _locations(env, item.name) == ("arch",)
    assert env.archive.stored_file(item.name, item.target_name).read_bytes() == data


def test_a_rewritten_input_with_an_automatic_identifier_gets_a_new_one(env: Env) -> None:
    """With automatic identifiers, an input whose bytes changed after registering is
    put back and deposited again under a new identifier, its new bytes stored."""
    env = env.auto_ids()
    data = os.urandom(12_000)
    item = env.until(env.drop("grown.wav", data, placement="rename"), State.REGISTERED)
    _append(_work(env, item), b"more")
    item = env.until(env.step(item, Step.PUBLISH), State.RETURNED)
    again = env.until(env.journal_existing("grown.wav", placement="rename"), State.DONE)
    assert again.state is State.DONE and again.name != item.name
    assert env.archive.stored_file(again.name, again.target_name).read_bytes() == data + b"more"


def test_a_short_read_of_an_intact_input_never_withdraws_its_location(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input whose ctime alone moved (a mode change, an SSHFS remount) is hashed
    again; a read that ends early (a flaky network filesystem, as the stage step
    guards against) must not count as changed bytes: the location stays."""
    data = os.urandom(50_000)
    item = env.until(env.drop("flaky.dat", data, placement="rename"), State.REGISTERED)
    os.chmod(_work(env, item), 0o640)  # ctime only: UNSURE, hashed again

    def short_read(src: int, dst: object, **_kw: object) -> CopyResult:
        got = os.pread(src, 20_000, 0)  # the filesystem answered EOF early
        return CopyResult(sha1=hashlib.sha1(got).hexdigest(), size=len(got))

    monkeypatch.setattr(release, "copy_hashing", short_read)
    item = env.step(item, Step.PUBLISH)
    assert item.state is not State.RETURNING, item.error_message
    assert _locations(env, item.name) == ("arch",)


def test_a_read_error_while_hashing_again_never_withdraws(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error while an UNSURE input is hashed again is transient: the input
    waits in the work folder, whole, and the record keeps its location."""
    data = os.urandom(9_000)
    item = env.until(env.drop("eio.dat", data, placement="rename"), State.REGISTERED)
    os.chmod(_work(env, item), 0o640)

    def failing(src: int, dst: object, **_kw: object) -> CopyResult:
        raise SourceReadError(5, "Input/output error", "eio.dat")

    monkeypatch.setattr(release, "copy_hashing", failing)
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "input-unreadable")
    assert _locations(env, item.name) == ("arch",)
    assert _work(env, item).read_bytes() == data


# -- crash points -----------------------------------------------------------------------


def test_a_crash_after_the_publish_link_is_replayed_as_a_publish(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the link into resources/ (mode and ctime already changed, the work
    name still there), the replayed publish publishes; nothing is withdrawn."""
    data = os.urandom(15_000)
    item = env.until(env.drop("linked.dat", data, placement="rename"), State.REGISTERED)
    crash_at(monkeypatch, "after-publish-link")
    with pytest.raises(Crash):
        env.steps.run(item, Step.PUBLISH)
    item = env.journal.get(item.id)
    assert item is not None and item.state is State.REGISTERED
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and _locations(env, item.name) == ("arch",)
    assert env.archive.stored_file(item.name, item.target_name).read_bytes() == data


def test_a_write_through_the_linked_name_after_a_crash_never_withdraws(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the link, the input then written through its work name (the same
    inode as the stored file): the replay finds a stored entry and leaves the record's
    location alone."""
    data = os.urandom(15_000)
    item = env.until(env.drop("shared.dat", data, placement="rename"), State.REGISTERED)
    crash_at(monkeypatch, "after-publish-link")
    with pytest.raises(Crash):
        env.steps.run(item, Step.PUBLISH)
    _append(_work(env, item))
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    assert _locations(env, item.name) == ("arch",)


def test_a_crash_before_the_withdrawal_was_saved_puts_back_once_on_replay(env: Env) -> None:
    """Killed after the withdrawing publish, before RETURNING was saved, and again in
    the put-back: the replays put the input back whole, once; the record untouched."""
    data = os.urandom(9_000)
    item = env.until(env.drop("replay.dat", data, placement="rename"), State.REGISTERED)
    _append(_work(env, item), b"more")
    env.steps.run(item, Step.PUBLISH)  # its result never saved
    item = env.step(env.journal.get(item.id) or item, Step.PUBLISH)
    assert item.state is State.RETURNING
    env.steps.run(item, Step.PUT_BACK)  # put back, not saved
    item = env.step(item, Step.PUT_BACK)
    assert item.state is State.RETURNED
    assert sorted(p.name for p in env.inbox.iterdir()) == [".nbank", "rejected", "replay.dat"]
    assert (env.inbox / "replay.dat").read_bytes() == data + b"more"
    assert _locations(env, item.name or "") == ("arch",)


def test_a_withdrawal_lost_with_the_journal_never_leaves_a_stored_copy_unlocated(
    env: Env,
) -> None:
    """A power loss after the registry removed the location and before RETURNING was
    on disk, taking the writer's unflushed append with it (the input is back to its
    registered bytes, size and mtime): the replay publishes, and the record must then
    list the archive that holds the copy."""
    data = os.urandom(9_000)
    item = env.until(env.drop("power.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env, item)
    before = os.stat(work)
    _append(work, b"unflushed")
    env.steps.run(item, Step.PUBLISH)  # DELETE committed; the journal's save lost
    os.truncate(work, before.st_size)  # ext4 after the power loss: the append is gone
    os.utime(work, ns=(before.st_atime_ns, before.st_mtime_ns))
    item = env.until(env.journal.get(item.id) or item, State.DONE)
    assert item.state is State.DONE
    assert env.archive.stored_file(item.name, item.target_name).read_bytes() == data
    assert _locations(env, item.name) == ("arch",), "stored, but the record lists no archive"


# -- folders ----------------------------------------------------------------------------


def test_a_folder_whose_modes_changed_is_published_not_withdrawn(folder_env: FolderEnv) -> None:
    """A folder input whose files' modes changed after registering (ctime only) is
    hashed again and published; its record keeps its location."""
    item, files = folder_env.drop_folder("modes", verify=True)
    item = folder_env.until(item, State.REGISTERED)
    work = folder_env.inbox / ".nbank" / item.token
    os.chmod(work / "sub" / "b.dat", 0o600)
    item = folder_env.until(item, State.DONE)
    assert item.state is State.DONE
    record = folder_env.registry.get_resource(item.name or "")
    assert record is not None and tuple(record.locations) == ("arch",)
    for rel, data in files.items():
        assert (folder_env.stored_folder(item) / rel).read_bytes() == data


def test_a_folder_that_gained_a_file_goes_back_whole(folder_env: FolderEnv) -> None:
    """A folder that gained a file after registering is withdrawn and put back into the
    inbox with every file, the late one included."""
    item, files = folder_env.drop_folder("grew", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    work = folder_env.inbox / ".nbank" / item.token
    (work / "late.dat").write_bytes(b"late")
    item = folder_env.until(item, State.RETURNED)
    assert item.state is State.RETURNED
    for rel, data in {**files, "late.dat": b"late"}.items():
        assert (folder_env.inbox / "grew" / rel).read_bytes() == data
    assert not any((folder_env.archive_root / "resources").rglob("*.dat"))


def test_a_folder_crashed_after_its_rename_into_place_is_not_withdrawn(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after a folder was renamed into resources/, the replay finds it gone from
    the work folder and finishes the publish: nothing is withdrawn."""
    item, files = folder_env.drop_folder("placed", verify=True)
    item = folder_env.until(item, State.REGISTERED)
    crash_at(monkeypatch, "after-publish-link")
    with pytest.raises(Crash):
        folder_env.steps.run(item, Step.PUBLISH)
    item = folder_env.until(item, State.DONE)
    assert item.state is State.DONE
    record = folder_env.registry.get_resource(item.name or "")
    assert record is not None and tuple(record.locations) == ("arch",)
    for rel, data in files.items():
        assert (folder_env.stored_folder(item) / rel).read_bytes() == data


# -- rounds -----------------------------------------------------------------------------


def test_a_withdrawn_publish_goes_on_to_its_put_back_in_the_next_round(env: Env) -> None:
    """In the lane's rounds a withdrawn publish keeps going: saved RETURNING, and the
    next round puts the input back."""
    data = os.urandom(9_000)
    item = env.until(env.drop("round.dat", data, placement="rename"), State.REGISTERED)
    _append(_work(env, item), b"more")
    [moved] = run_round(env.steps, [item], now=time.time())
    assert (moved.item.state, moved.more) == (State.RETURNING, True)
    assert env.journal.get(item.id) == moved.item
    [moved] = run_round(env.steps, [moved.item], now=time.time())
    assert moved.item.state is State.RETURNED
    assert (env.inbox / "round.dat").read_bytes() == data + b"more"


KINDS = st.sampled_from(
    ["ok"] * 4 + ["transient", "permanent", "changed", "gone", "restage", "withdrawn"]
)


@given(st.lists(KINDS, max_size=60))
@example(["ok", "ok", "ok", "ok", "withdrawn", "restage", "permanent"])  # found by hypothesis
def test_property_with_withdrawals_registered_items_are_never_rejected(kinds: list[str]) -> None:
    """With "withdrawn" among the outcomes, a registered item never reaches REJECTING,
    and a final state stays final."""
    p = Progress(State.CLAIMING)
    registered = False
    for kind in kinds:
        step = next_step(p, max(1.0, p.not_before))
        if step is None:
            assert p.state in FINAL
            break
        p = advance(p, step, Outcome(kind, "code"), max(1.0, p.not_before))
        assert not (registered and p.state in (State.REJECTING, State.REJECTED)), p
        registered = registered or p.registered


# -- django-neurobank -------------------------------------------------------------------


def _django_env(root: Path, server: DjangoServer, auth: tuple[str, str]) -> Env:
    registry = HttpRegistry(server.url, auth)
    archive = opening.create_archive(root / "arch", registry.url)
    name = server.add_archive(str(archive.path))
    dtype = server.add_datatype(content_type="application/octet-stream")
    return env_on(root, registry, archive, name, dtype)


def _rig_account(server: DjangoServer) -> tuple[str, str]:
    """An account with the guide's rig permissions (docs/lab-deployment.md):
    add_resource and add_location, nothing else."""
    user, password = unique_name("rig"), secrets.token_urlsafe(16)
    server.shell(
        "from django.contrib.auth.models import Permission, User; "
        f"u = User.objects.create_user({user!r}, password={password!r}); "
        "u.user_permissions.set(Permission.objects.filter("
        "content_type__app_label='nbank_registry', "
        "codename__in=('add_resource', 'add_location')))"
    )
    return user, password


@pytest.fixture
def admin_env(tmp_path: Path, django_registry: DjangoServer) -> Iterator[Env]:
    env = _django_env(tmp_path, django_registry, django_registry.auth)
    yield env
    env.journal.close()
    env.registry.close()


def test_a_rig_account_puts_back_a_changed_input(
    tmp_path: Path, django_registry: DjangoServer
) -> None:
    """With the rig account the lab guide prescribes (add_resource, add_location), a
    changed in-place input is put back as with the embedded registry, not kept hidden
    in the work folder retrying a DELETE it may never make."""
    env = _django_env(tmp_path, django_registry, _rig_account(django_registry))
    try:
        data = os.urandom(9_000)
        name = unique_name("rig") + ".dat"
        item = env.until(env.drop(name, data, placement="rename"), State.REGISTERED)
        _append(_work(env, item), b"more")
        item = env.step(item, Step.PUBLISH)
        assert item.state is State.RETURNING, f"{item.error_code}: {item.error_message}"
    finally:
        env.journal.close()
        env.registry.close()


def test_a_location_already_gone_from_django_still_puts_back(admin_env: Env) -> None:
    """A record whose location an administrator removed already (django answers 404
    to another DELETE of it): a changed input goes back all the same."""
    env = admin_env
    name = unique_name("gone") + ".dat"
    item = env.until(env.drop(name, os.urandom(9_000), placement="rename"), State.REGISTERED)
    env.registry.remove_location(item.name or "", env.spec.archive_name)
    with pytest.raises(errors.NotFound):
        env.registry.remove_location(item.name or "", env.spec.archive_name)
    _append(_work(env, item), b"more")
    item = env.until(env.step(item, Step.PUBLISH), State.RETURNED)
    assert item.state is State.RETURNED and (env.inbox / name).exists()


def test_django_down_at_the_withdrawal_still_puts_the_input_back(
    admin_env: Env, django_registry: DjangoServer
) -> None:
    """The registry unreachable when a changed in-place input is withdrawn: nothing of
    the withdrawal asks the registry, so the input goes back whole all the same."""
    env = admin_env
    name = unique_name("down") + ".dat"
    data = os.urandom(9_000)
    item = env.until(env.drop(name, data, placement="rename"), State.REGISTERED)
    _append(_work(env, item), b"more")
    live = env.steps.registry
    env.steps.registry = HttpRegistry("http://127.0.0.1:9/neurobank/", django_registry.auth)
    try:
        item = env.until(env.step(item, Step.PUBLISH), State.RETURNED)
    finally:
        env.steps.registry.close()
        env.steps.registry = live
    assert item.state is State.RETURNED
    assert (env.inbox / name).read_bytes() == data + b"more"
