"""nbankctl deposit on a filesystem that says every file is open for writing (NFSv4
without a read delegation, CIFS without an oplock): it asks about a file of its own
first, and then cannot tell, instead of refusing every file. The kernel's EAGAIN of
such a filesystem is simulated on nbankd's own lease question (``writers._ask``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fixtures.holders import held_open
from fixtures.manual_env import ManualFiles, manual_folder
from fixtures.steps_env import Env, env
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import State
from nbankd.names import WORK_DIR_NAME
from nbankd.watch import writers

__all__ = ["env"]


@pytest.fixture
def files(env: Env) -> Iterator[ManualFiles]:
    with manual_folder(env) as made:
        yield made


def test_a_filesystem_saying_open_for_every_file_does_not_refuse_them(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where every lease is refused (the deposit's own new probe too), a closed file is
    journaled (cannot tell), copied rather than moved in place, and deposited; the
    probe is removed."""
    inbox, spec, folder = files
    monkeypatch.setattr(writers, "_ask", lambda fd: True)  # every lease: EAGAIN
    (folder / "rec.dat").write_bytes(b"recorded")
    manual.calibrate(spec)
    items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert refused == []
    assert items[0].placement == "copy"
    assert env.until(items[0], State.DONE).state is State.DONE
    assert os.listdir(folder / WORK_DIR_NAME) == []


def test_without_asking_about_its_probe_every_file_reads_open_there(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same filesystem without the probe's question: the closed file is refused as
    still being written (what the probe is for)."""
    inbox, _spec, folder = files
    monkeypatch.setattr(writers, "_ask", lambda fd: True)
    (folder / "rec.dat").write_bytes(b"recorded")
    items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert items == []
    assert [name for name, _why in refused] == ["rec.dat"]


def test_a_file_open_for_writing_is_refused_where_the_probe_reads_closed(
    env: Env, files: ManualFiles
) -> None:
    """Where the probe reads closed (a local filesystem), a file a program holds open
    for writing is refused as before, and no probe is left in the work folder."""
    inbox, spec, folder = files
    (folder / "rec.dat").write_bytes(b"recorded")
    manual.calibrate(spec)
    with held_open(folder / "rec.dat"):
        items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert items == []
    assert [name for name, _why in refused] == ["rec.dat"]
    assert os.listdir(folder / WORK_DIR_NAME) == []


def test_where_leases_cannot_tell_a_writer_seen_in_proc_is_still_refused(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a filesystem that refuses every lease, a file another process of this host
    holds open for writing (seen in /proc) is still refused, and a closed one beside it
    is journaled."""
    inbox, spec, folder = files
    monkeypatch.setattr(writers, "_ask", lambda fd: True)  # every lease: EAGAIN
    (folder / "busy.dat").write_bytes(b"recording")
    (folder / "done.dat").write_bytes(b"recorded")
    manual.calibrate(spec)
    with held_open(folder / "busy.dat"):
        items, refused = manual.journal_files(
            env.journal, inbox, ["busy.dat", "done.dat"], kind="file", now=0.0
        )
    assert [name for name, _why in refused] == ["busy.dat"]
    assert [i.relpath_str for i in items] == ["done.dat"]
