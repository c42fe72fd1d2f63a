"""Hostile review of the fixes landed on main today (de5184a..): the placement probe of
``nbankctl deposit``, inbox-side failures waiting as ``inbox-not-writable``, journal
schemas 6 and 7, the group-commit fixes (sha1-held, the busy short-circuit,
``metadata_as_stored``) and the policy group id cache.

Each test names one behaviour a user relies on; those not labelled as guards fail on
the code they were written against.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.cli_backends import NBANKCTL, json_stream
from fixtures.daemon import DaemonHarness
from fixtures.django_server import DjangoServer, aliasing_server
from fixtures.faults import fsync_fails_for
from fixtures.manual_env import ManualFiles, manual_folder
from fixtures.steps_env import Env, env, env_on
from fixtures.users import TestUser
from nbankd import seams
from nbankd.archive import opening
from nbankd.daemon.status import waiting_problems
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import FINAL, State, Step, next_step
from nbankd.deposit.rounds import run_round
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.http import HttpRegistry

__all__ = ["env"]


@pytest.fixture
def files(env: Env) -> Iterator[ManualFiles]:
    with manual_folder(env) as made:
        yield made


# -- 1. inbox-side failures: an fsync of the inbox's folders is the inbox's too ---------


def test_a_release_whose_work_folder_fsync_fails_waits_as_the_inboxs_problem(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release whose inbox work folder cannot be fsynced (EIO of the inbox's disk)
    waits as inbox-not-writable, told against the inbox, never as archive-unavailable."""
    item = env.until(env.drop("rec.dat", os.urandom(5000)), State.RECORDED)
    with monkeypatch.context() as faults:
        fsync_fails_for(faults, env.inbox / WORK_DIR_NAME)
        item = env.step(item, Step.RELEASE)
    assert item.state is State.RECORDED
    assert item.error_code == "inbox-not-writable", (item.error_code, item.error_message)
    [line] = waiting_problems([item])
    assert line.startswith(f"inbox {env.spec.key}:"), line


def test_a_rounds_claim_whose_inbox_fsync_fails_waits_as_the_inboxs_problem(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim in a round (the lane of small files) whose inbox folder's deferred fsync
    fails waits as inbox-not-writable, told against the inbox, as outside a round."""
    item = env.drop("rec.dat", os.urandom(5000))
    with monkeypatch.context() as faults:
        fsync_fails_for(faults, env.inbox)
        [moved] = run_round(env.steps, [item], now=float("inf"))
    assert moved.item.error_code == "inbox-not-writable", (
        moved.item.error_code,
        moved.item.error_message,
    )
    [line] = waiting_problems([moved.item])
    assert line.startswith(f"inbox {env.spec.key}:"), line


def test_a_claim_that_moved_the_input_but_could_not_fsync_does_not_say_it_was_left(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim whose rename into .nbank/ happened but whose fsync failed does not tell
    the user the input could not be moved and waits where it was (it is in .nbank/)."""
    item = env.drop("rec.dat", os.urandom(5000))
    with monkeypatch.context() as faults:
        fsync_fails_for(faults, env.inbox / WORK_DIR_NAME)
        item = env.step(item, Step.CLAIM)
    assert not (env.inbox / "rec.dat").exists()
    assert (env.inbox / WORK_DIR_NAME / item.token).exists()  # it was moved
    message = item.error_message or ""
    assert "cannot move" not in message, message


# -- 2. group commit: a lost answer on a server that stores metadata otherwise -----------


def test_a_lost_registration_answer_is_found_ours_on_a_server_aliasing_metadata_keys(
    tmp_path: Path, django_registry: DjangoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """django-neurobank configured with NBANK_METADATA_ALIASES (bird -> animal) commits
    a registration whose answer is lost: the retry finds the record its own (the bird
    is stored as the record's animal) and the input is deposited, never waiting as
    identifier-busy for ever with a record and no stored file."""
    server = django_registry
    bird = server.add_animal()
    with aliasing_server(server, tmp_path) as url:
        registry = HttpRegistry(url, (server.username, server.password))
        archive = opening.create_archive(tmp_path / "arch", registry.url)
        name = server.add_archive(str(archive.path))
        dtype = server.add_datatype(content_type="application/octet-stream")
        e = env_on(tmp_path / "side", registry, archive, name, dtype)
        try:
            stem = f"b{os.urandom(5).hex()}"
            sidecar = f"{stem}.bin.nbank.yaml"
            (e.inbox / sidecar).write_bytes(f"metadata: {{bird: {bird}}}\n".encode())
            (e.inbox / f"{stem}.bin").write_bytes(os.urandom(3000))
            item = e.journal_existing(f"{stem}.bin", sidecar=os.fsencode(sidecar))
            item = e.until(item, State.CHECKED)
            with monkeypatch.context() as faults:  # committed, its answer never seen
                faults.setattr(seams, "_raise", "after-register-request")
                item = e.step(item, Step.REGISTER)
            record = registry.get_resource(stem)
            assert record is not None and record.animal == bird  # the registry holds it
            seen = []
            for _ in range(24):
                if item.state in FINAL:
                    break
                step = next_step(item.progress, float("inf"))
                assert step is not None
                item = e.step(item, step)
                seen.append((str(step), item.error_code))
            assert item.state is State.DONE, seen[-4:]
            assert e.stored() == [f"{stem[:2]}/{stem}.bin"]
        finally:
            e.journal.close()
            registry.close()


# -- guards (pass today): what held up -----------------------------------------------


def test_guard_a_probe_name_taken_on_either_side_means_copy_and_removes_nothing_of_theirs(
    env: Env, files: ManualFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: the placement probe's name already taken in the archive's staging/ (or in
    the folder's .nbank/) means copy, and the entry of that name is left as it was."""
    _inbox, _spec, folder = files
    monkeypatch.setattr(manual.secrets, "token_hex", lambda _n=None: "0" * 16)
    probe = f"{manual.PROBE_PREFIX}placement-{'0' * 16}"
    theirs = env.archive.staging_dir / probe
    theirs.write_bytes(b"someone else's")
    assert manual.placement_for(folder, env.archive.path) == "copy"
    assert theirs.read_bytes() == b"someone else's"
    assert os.listdir(folder / WORK_DIR_NAME) == []
    theirs.unlink()
    mine = folder / WORK_DIR_NAME / probe
    mine.write_bytes(b"not the probe's")
    assert manual.placement_for(folder, env.archive.path) == "copy"
    assert mine.read_bytes() == b"not the probe's"
    assert os.listdir(env.archive.staging_dir) == []


def test_guard_a_file_the_daemons_user_does_not_own_is_copied_not_moved_in_place(
    daemon_factory: Any, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """Guard: handed a file another user owns, on the archive's mount (the probe, made
    with a file of the daemon's own, says rename), the daemon copies it (no lease can
    tell whether it is still written), so its mode is never to be set in place:
    deposited, not held registered and unpublished."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    folder = h.root / "session"
    folder.mkdir()
    os.chown(folder, unpriv_user.uid, unpriv_user.gid)
    src = folder / "theirs.wav"
    src.write_bytes(os.urandom(4000))
    os.chown(src, other_user.uid, other_user.gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    argv = [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype]
    try:
        r = subprocess.run(
            [*argv, "-j", "--wait", "30", str(src)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        h.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert json_stream(r.stdout) == [{"source": str(src), "id": "theirs"}]
    assert (h.archive / "resources" / "th" / "theirs.wav").is_file()
