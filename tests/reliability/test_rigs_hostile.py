"""Hostile review of a lab of rigs: several nbankd daemons, each with its own state
folder, inbox and registry account, depositing into ONE shared archive and ONE shared
django-neurobank registry (the set-up of tests/reliability/test_lab_of_rigs.py).

Findings (each test fails on the code it was written against):

- a rig with ``placement: rename`` whose identifier another rig stored first with
  the same bytes (``publish_in_place`` finds the target identical, not its own inode)
  unlinks its input at once, before any read-back of the copy that stands in for it,
  and its receipt says ``deposited`` instead of ``already-deposited``: the ``ours``
  answer of :func:`nbankd.archive.durable.publish_in_place` is ignored by the publish
  step;
- ``nbankctl check archive --fix`` on a host whose clock runs ahead judges another
  rig's live staged copy an hour-old leftover by its own clock and deletes it.

Guards (pass; kept because they pin cross-rig behaviour no other test pins): a rig
killed right after its publish link while another rig deposits the same name and
bytes; one name with other bytes on rigs of mixed placements.
"""

from __future__ import annotations

import hashlib
import os
import pty
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from fixtures.daemon import DaemonHarness, wait_for
from fixtures.django_server import DjangoServer, unique_name
from reliability.test_lab_of_rigs import _rigs

#: the same description on every rig: a registering rig that finds the record made by
#: another rig takes it for its own (at_register), so both go on to publish
SAME = {"metadata": {"lab": "songbird"}}
NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))


def _stop(*rigs: DaemonHarness) -> None:
    for h in rigs:
        if h.proc is not None and h.proc.poll() is None:
            h.stop()


def _pause_at(tmp_path: Path, point: str) -> tuple[dict[str, str], Path]:
    """The environment holding a daemon at ``point`` until the returned path exists
    (``<path>.reached`` appears when it gets there)."""
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    return {"NBANKD_PAUSE_AT": point, "NBANKD_PAUSE_UNTIL": str(go)}, go


def _reached(go: Path) -> bool:
    return Path(f"{go}.reached").exists()


def _stored(archive: Path, stem: str) -> list[Path]:
    return sorted(archive.joinpath("resources").rglob(f"{stem}*"))


def _records(server: DjangoServer, data: bytes) -> list[dict[str, Any]]:
    sha1 = hashlib.sha1(data).hexdigest()
    r = requests.get(f"{server.url}resources/", params={"sha1": sha1}, timeout=30)
    r.raise_for_status()
    return list(r.json())


def _inodes_under(folder: Path) -> set[int]:
    return {p.lstat().st_ino for p in folder.rglob("*")}


# --- findings --------------------------------------------------------------------------


def _rename_rig_second(
    server: DjangoServer, tmp_path: Path, crash_at: str | None = None, b_verify: bool = True
) -> tuple[DaemonHarness, DaemonHarness, str, bytes, int]:
    """Rig A (placement rename) registers NAME.dat and is held; rig B (copy) deposits
    the same name and bytes (its registration finds A's record, the same description:
    taken as its own) and stores it; then A goes on to publish. Returns (A, B, name,
    bytes, inode of A's input); A has settled, or exited at ``crash_at``."""
    options = [{**SAME, "placement": "rename"}, {**SAME, "verify": b_verify}]
    a, b = _rigs(server, tmp_path, options)[3]
    env, go = _pause_at(tmp_path, "after-register")
    if crash_at is not None:
        env["NBANKD_CRASH_AT"] = crash_at
    data = os.urandom(30_000)
    name = unique_name("take")
    try:
        a.start(env=env)
        b.start()
        ino = a.drop(f"{name}.dat", data).lstat().st_ino
        wait_for(lambda: _reached(go), 30, "rig A to register")
        b.drop(f"{name}.dat", data)
        b.wait_settled(1)
        go.touch()
        if crash_at is None:
            a.wait_settled(1)
        else:
            a.wait_exit(30)
    finally:
        go.touch()
        _stop(a, b)
    [stored] = _stored(a.archive, name)
    assert stored.lstat().st_ino != ino  # B's copy is the stored file, not A's input
    return a, b, name, data, ino


def test_rename_rig_finding_another_rigs_copy_stored_says_already_deposited(
    django_registry: DjangoServer, tmp_path: Path
) -> None:
    """A rename-placement rig whose identifier another rig stored first with the same
    bytes gets an already-deposited receipt (its own file was never stored)."""
    a, b, _name, data, _ino = _rename_rig_second(django_registry, tmp_path)
    assert [r["outcome"] for r in b.receipts()] == ["deposited"]
    assert [r["outcome"] for r in a.receipts()] == ["already-deposited"]
    assert len(_records(django_registry, data)) == 1


def test_rename_rig_keeps_its_input_until_a_copy_it_relies_on_is_read_back(
    django_registry: DjangoServer, tmp_path: Path
) -> None:
    """A rename-placement rig (verify on) whose identifier a copy rig with verify off
    stored first keeps its input until it has read that copy back from storage: killed
    at the end of its publish step (before its verify step), its input still exists."""
    a, _b, _name, _data, ino = _rename_rig_second(
        django_registry, tmp_path, crash_at="after-publish", b_verify=False
    )
    # neither rig has read the stored copy back from storage at this point (B: verify
    # off; A: killed before its verify step), and B's input is already gone
    assert ino in _inodes_under(a.inbox), "rig A unlinked its input before any read-back"


def _fast_clock_env(tmp_path: Path, seconds: float) -> dict[str, str]:
    """The environment of a Python program on a host whose clock is ``seconds`` ahead
    (a sitecustomize shifting time.time and time.time_ns)."""
    site = tmp_path / f"skew-{secrets.token_hex(3)}"
    site.mkdir()
    site.joinpath("sitecustomize.py").write_text(
        "import time\n"
        "_real, _real_ns = time.time, time.time_ns\n"
        f"time.time = lambda: _real() + {seconds!r}\n"
        f"time.time_ns = lambda: _real_ns() + {int(seconds * 1e9)!r}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    env["PYTHONPATH"] = str(site)
    return env


def _check_fix_at_terminal(
    server: DjangoServer, archive: Path, answers: str, env: dict[str, str]
) -> str:
    """``nbankctl check archive --fix`` with a terminal as standard input on which
    ``answers`` were typed; what it said."""
    master, slave = pty.openpty()
    try:
        os.write(master, answers.encode())
        proc = subprocess.run(
            [NBANKCTL, "-r", server.url, "check", "archive", str(archive), "--fix", "--no-hash"],
            stdin=slave, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    finally:
        os.close(slave)
        os.close(master)
    return proc.stdout + proc.stderr


def test_check_fix_on_a_host_with_a_fast_clock_spares_a_rigs_live_staged_copy(
    django_registry: DjangoServer, tmp_path: Path
) -> None:
    """check archive --fix answered [d]elete at a terminal, on a host whose clock runs
    two hours ahead, while a rig holds the staged copy of an input it is depositing
    (written a moment ago): that staged copy is not deleted as an old leftover."""
    [rig] = _rigs(django_registry, tmp_path, [SAME])[3]
    env, go = _pause_at(tmp_path, "after-register")
    name = unique_name("skew")
    try:
        rig.start(env=env)
        rig.drop(f"{name}.dat", os.urandom(20_000))
        wait_for(lambda: _reached(go), 30, "the rig to register")
        [staged] = [p for p in (rig.archive / "staging").iterdir() if p.name.startswith(".nbankd-")]
        said = _check_fix_at_terminal(
            django_registry, rig.archive, "d\n" * 4, _fast_clock_env(tmp_path, 7200)
        )
        kept = staged.exists()
        go.touch()
        rig.wait_settled(1)
    finally:
        go.touch()
        _stop(rig)
    assert [r["outcome"] for r in rig.receipts()] == ["deposited"]  # it copies again
    assert kept, said


# --- guards (pass) -----------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["copy", "rename"])
def test_guard_rig_killed_after_its_publish_link_while_another_deposits_the_same(
    django_registry: DjangoServer, tmp_path: Path, placement: str
) -> None:
    """Guard: rig A killed -9 right after linking its file, rig B then deposits the
    same name and bytes, A restarted: one record, one stored file with the bytes, one
    deposited and one already-deposited receipt, nothing left in staging/ or work."""
    a, b = _rigs(django_registry, tmp_path, [{**SAME, "placement": placement}, SAME])[3]
    data = os.urandom(30_000)
    name = unique_name("kill")
    try:
        a.start(env={"NBANKD_CRASH_AT": "after-publish-link"})
        b.start()
        a.drop(f"{name}.dat", data)
        a.wait_exit(30)
        b.drop(f"{name}.dat", data)
        b.wait_settled(1)
        a.start()
        a.wait_settled(1)
    finally:
        _stop(a, b)
    assert sorted(r["outcome"] for r in a.receipts() + b.receipts()) == [
        "already-deposited",
        "deposited",
    ]
    assert [p.read_bytes() for p in _stored(a.archive, name)] == [data]
    assert len(_records(django_registry, data)) == 1
    assert list((a.archive / "staging").iterdir()) == []
    assert not [p for h in (a, b) for p in h.inbox.joinpath(".nbank").glob("*/*")]


@pytest.mark.parametrize("placements", [("rename", "rename"), ("copy", "rename")])
def test_guard_one_name_two_contents_on_rigs_of_mixed_placements(
    django_registry: DjangoServer, tmp_path: Path, placements: tuple[str, str]
) -> None:
    """Guard: one name with other bytes on two rigs (placements as given) at once: one
    record and one stored file with the winner's bytes; the loser kept in rejected/,
    name-taken."""
    a, b = _rigs(django_registry, tmp_path, [{"placement": p} for p in placements])[3]
    name = unique_name("clash")
    inputs = [(a, os.urandom(20_000)), (b, os.urandom(20_000))]
    try:
        a.start()
        b.start()
        for h, data in inputs:
            h.root.joinpath(".next").write_bytes(data)
        for h, _data in inputs:
            os.rename(h.root / ".next", h.inbox / f"{name}.dat")
        a.wait_settled(1)
        b.wait_settled(1)
    finally:
        _stop(a, b)
    [stored] = _stored(a.archive, name)
    record = requests.get(f"{django_registry.url}resources/{name}/", timeout=30).json()
    assert record["sha1"] == hashlib.sha1(stored.read_bytes()).hexdigest()
    [(loser, lost)] = [(h, data) for h, data in inputs if data != stored.read_bytes()]
    assert [r["code"] for r in loser.reasons()] == ["name-taken"]
    assert (loser.rejected / f"{name}.dat").read_bytes() == lost
