"""A deposit step whose change in the inbox fails (the inbox mounted read-only) waits as
the inbox's problem, ``inbox-not-writable``, never the archive's: the steps are driven
directly on an inbox reached through a private mount namespace, where a read-only bind
mount of the inbox folder refuses every change in it (EROFS, root included)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.mountns import MountNamespace
from fixtures.steps_env import Env, env_on
from nbankd.archive import opening
from nbankd.daemon.status import waiting_problems
from nbankd.daemon.tally import Tally
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.registry.factory import open_registry


@dataclass
class ReadOnlyInbox:
    env: Env
    ns: MountNamespace
    inbox: Path  # the inbox folder as the namespace names it

    def read_only(self) -> None:
        """Mounts the inbox folder read-only over itself (in the namespace only)."""
        self.ns.run("mount", "--bind", self.inbox, self.inbox)
        self.ns.run("mount", "-o", "remount,bind,ro", self.inbox)


@pytest.fixture
def ro(tmp_path: Path, mount_ns: MountNamespace) -> Iterator[ReadOnlyInbox]:
    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    archive = opening.create_archive(tmp_path / "arch", registry.url)
    registry.add_datatype("test-file")
    registry.add_archive("arch", "neurobank", str(archive.path))
    # everything of the inbox's side reached through the namespace: its mounts apply
    made = env_on(mount_ns.view(tmp_path / "side"), registry, archive, "arch", "test-file")
    yield ReadOnlyInbox(made, mount_ns, tmp_path / "side" / "inbox")
    made.journal.close()
    registry.close()


def _recorded(ro: ReadOnlyInbox) -> Item:
    return ro.env.until(ro.env.drop("rec.dat", os.urandom(20_000)), State.RECORDED)


def test_release_in_a_read_only_inbox_waits_as_the_inboxs_problem(ro: ReadOnlyInbox) -> None:
    """A deposited input the release cannot remove waits with inbox-not-writable."""
    item = _recorded(ro)
    ro.read_only()
    item = ro.env.step(item, Step.RELEASE)
    assert (item.state, item.error_code) == (State.RECORDED, "inbox-not-writable")
    assert (ro.env.inbox / ".nbank" / item.token).exists()  # nothing lost


def test_release_failure_names_the_work_folder_and_the_fix(ro: ReadOnlyInbox) -> None:
    """Its message names the input and the inbox's work folder; the hint says remount."""
    item = _recorded(ro)
    ro.read_only()
    item = ro.env.step(item, Step.RELEASE)
    message = item.error_message or ""
    assert str(ro.env.spec.work_dir) in message and "rec.dat" in message, message
    assert "Read-only file system" in message and "read-write again" in message, message


def test_status_puts_a_release_failure_against_the_inbox(ro: ReadOnlyInbox) -> None:
    """nbankctl status groups the waiting input under its inbox, not its archive."""
    item = _recorded(ro)
    ro.read_only()
    item = ro.env.step(item, Step.RELEASE)
    [line] = waiting_problems([item])
    assert line.startswith(f"inbox {ro.env.spec.key}: 1 input(s) waiting after "), line


def test_metrics_count_no_archive_error_for_a_release_failure(ro: ReadOnlyInbox) -> None:
    """The failure is no error of the archive in the metrics."""
    item = _recorded(ro)
    ro.read_only()
    item = ro.env.step(item, Step.RELEASE)
    tally = Tally()
    tally.record(item, attempts_before=0)
    assert (tally.failures["inbox-not-writable"], tally.archive_errors["arch"]) == (1, 0)


def test_put_back_in_a_read_only_inbox_waits_as_the_inboxs_problem(ro: ReadOnlyInbox) -> None:
    """An input changed after its record, to go back, waits with inbox-not-writable."""
    item = _recorded(ro)
    with open(ro.env.inbox / ".nbank" / item.token, "ab") as writer:  # a writer kept it
        writer.write(b"more")
    item = ro.env.step(item, Step.RELEASE)
    assert item.state is State.RETURNING
    ro.read_only()
    item = ro.env.step(item, Step.PUT_BACK)
    assert (item.state, item.error_code) == (State.RETURNING, "inbox-not-writable")
    assert (ro.env.inbox / ".nbank" / item.token).exists()


def test_reject_in_a_read_only_inbox_waits_as_the_inboxs_problem(ro: ReadOnlyInbox) -> None:
    """An input to reject that cannot reach the rejected folder waits, inbox-not-writable."""
    item = ro.env.until(ro.env.drop("bad name!.dat", b"data"), State.REJECTING)
    ro.read_only()
    item = ro.env.step(item, Step.REJECT)
    assert (item.state, item.error_code) == (State.REJECTING, "inbox-not-writable")
    assert str(ro.env.spec.rejected_dir) in (item.error_message or "")
    assert (ro.env.inbox / ".nbank" / item.token).exists()


def test_claim_in_a_read_only_inbox_waits_as_the_inboxs_problem(ro: ReadOnlyInbox) -> None:
    """An input that cannot be taken into the work folder waits, inbox-not-writable."""
    item = ro.env.drop("new.dat", b"data")
    ro.read_only()
    item = ro.env.step(item, Step.CLAIM)
    assert (item.state, item.error_code) == (State.CLAIMING, "inbox-not-writable")
    assert (ro.env.inbox / "new.dat").read_bytes() == b"data"
