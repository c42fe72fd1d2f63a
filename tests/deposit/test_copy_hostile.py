"""Hostile review of the copy of an input into the archive: the input or the archive
misbehaving while the stage step copies it, and what the daemon then does and tells.

Faults are injected into this process's own system calls (as ``fixtures/faults.py``
does): an input whose reads fail with EIO, an archive disk that hands back a flipped
byte on every read; a full archive is a real 1 MiB tmpfs in a private mount namespace.
A rival writer of the group-writable ``staging/`` folder is played at the exact
instant it would have to win its race.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.steps_env import Env
from nbankd.archive import staging
from nbankd.control.alert_rules import Condition, conditions
from nbankd.control.alert_status import degraded_conditions
from nbankd.daemon import setup
from nbankd.daemon.status import waiting_problems
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step

TESTS = Path(__file__).resolve().parents[1]


def _told(env: Env, item: Item) -> list[Condition]:
    """What the alert service would tell of ``item`` waiting, built from the same parts
    it reads: the inbox's archive problem (the scan's ``archive_usable``), status's
    degraded lines (``waiting_problems``) and the journal's unfinished items."""
    status = {
        "inboxes": [
            {
                "path": env.spec.key,
                "archive_problem": setup.archive_usable(env.archive.path, env.registry.url),
            }
        ],
        "degraded": waiting_problems([item]),
    }
    told = conditions(
        status, {}, {}, now=1e10, started=0.0, unavailable_after=0.0, unfinished=[item]
    )
    return told + degraded_conditions(status, 0.0)


def _input_reads_fail(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Reads of the file at ``path`` (matched by its inode) fail with EIO, as a bad
    sector of the rig's disk or a dead network mount answers; other reads happen."""
    inode = path.stat().st_ino
    real = os.readv

    def readv(fd: int, buffers: list[memoryview]) -> int:
        if os.fstat(fd).st_ino == inode:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers)

    monkeypatch.setattr(os, "readv", readv)


def _unreadable_input_waiting(env: Env, monkeypatch: pytest.MonkeyPatch) -> Item:
    item = env.until(env.drop("bad-sector.dat", os.urandom(50_000)), State.CLAIMED)
    with monkeypatch.context() as faults:
        _input_reads_fail(faults, env.inbox / ".nbank" / item.token)
        item = env.step(item, Step.STAGE)
    assert item.state is State.CLAIMED and item.attempts == 1  # waits, retried later
    assert list(env.archive.staging_dir.iterdir()) == []
    return item


def test_an_input_whose_reads_fail_is_reported_against_its_inbox_not_the_archive(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input whose own reads fail (EIO) is reported as that input's (its inbox's)
    problem, never as its archive being unavailable: the archive is fine."""
    item = _unreadable_input_waiting(env, monkeypatch)
    assert setup.archive_usable(env.archive.path, env.registry.url) is None
    [line] = waiting_problems([item])
    assert not line.startswith("archive "), (
        f"status blames the archive for a read error of the input: {line!r}"
    )


def test_an_input_whose_reads_keep_failing_is_alerted(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input retried after its reads failed is told (a stuck input, docs/alerts.md:
    'a filesystem error'), not left to wait in the private work folder unmentioned."""
    item = _unreadable_input_waiting(env, monkeypatch)
    told = _told(env, item)
    assert told, (
        f"nothing is ever told of {item.relpath_str!r}, waiting after {item.error_code}: "
        f"{item.error_message}"
    )


def _archive_reads_flip_a_byte(monkeypatch: pytest.MonkeyPatch, archive: Path) -> list[int]:
    """Every read of a file under ``archive`` returns its first byte flipped, as a
    failing disk or controller would (the copy itself is written intact); returns the
    count of reads corrupted so far."""
    real = os.readv
    flipped = [0]
    inside = str(archive) + os.sep

    def readv(fd: int, buffers: list[memoryview]) -> int:
        n = real(fd, buffers)
        if n and os.readlink(f"/proc/self/fd/{fd}").startswith(inside):
            buffers[0][0] ^= 0xFF
            flipped[0] += 1
        return n

    monkeypatch.setattr(os, "readv", readv)
    return flipped


class _Runaway(Exception):
    """drive() ran far more steps than a deposit has."""


def test_a_copy_that_never_reads_back_right_waits_and_is_reported(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive whose read-back never matches (verify: true on a failing disk) makes
    the item wait with backoff and shows in status, never a worker copying, looking up,
    registering and reading it back again at once, forever and unreported."""
    data = os.urandom(50_000)
    item = env.until(env.drop("rec.dat", data), State.CLAIMED)
    flipped = _archive_reads_flip_a_byte(monkeypatch, env.archive.path)
    steps = [0]

    def beat() -> None:  # the worker's liveness beat, called before each step
        steps[0] += 1
        if steps[0] > 60:  # a deposit is a dozen steps; 15 rounds of restaging is a loop
            raise _Runaway

    try:
        item = env.steps.drive(item, on_step=beat)
    except _Runaway:
        pytest.fail(
            f"one drive() ran {steps[0]} steps without stopping: {flipped[0]} read-backs "
            "failed, each copied again at once (attempts stay 0, no backoff, nothing in "
            "status)"
        )
    assert flipped[0] >= 1
    assert item.attempts > 0 and item.not_before > 0
    assert waiting_problems([item]), "the failing read-back is not in status"


SCRIPT = r"""
import json, os, sys
from pathlib import Path
mnt, root, tests = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, tests)
from fixtures.steps_env import env_on
from nbankd.archive import opening
from nbankd.control.alert_rules import conditions
from nbankd.control.alert_status import degraded_conditions
from nbankd.daemon import setup
from nbankd.daemon.status import waiting_problems
from nbankd.deposit.lifecycle import State, Step
from nbankd.registry.factory import open_registry

registry = open_registry("embedded", embedded_db=root / "registry.sqlite3")
archive = opening.create_archive(mnt / "arch", registry.url)
registry.add_datatype("test-file")
registry.add_archive("arch", "neurobank", str(archive.path))
env = env_on(root, registry, archive, "arch", "test-file")
item = env.until(env.drop("big.dat", os.urandom(3 << 20)), State.CLAIMED)
item = env.step(item, Step.STAGE)
status = {
    "inboxes": [{"path": env.spec.key,
                 "archive_problem": setup.archive_usable(archive.path, registry.url)}],
    "degraded": waiting_problems([item]),
}
told = conditions(status, {}, {}, now=1e10, started=0.0, unavailable_after=0.0,
                  unfinished=[item])
told += degraded_conditions(status, 0.0)
print(json.dumps({
    "state": str(item.state), "attempts": item.attempts, "code": item.error_code,
    "message": item.error_message, "degraded": status["degraded"],
    "archive_problem": status["inboxes"][0]["archive_problem"],
    "told": [c.summary for c in told],
    "staging": sorted(os.listdir(archive.staging_dir)),
}))
"""


def test_an_input_waiting_on_a_full_archive_is_alerted(tmp_path: Path) -> None:
    """An input whose copy fails because the archive's filesystem is full is told (the
    archive 'cannot take deposits: ... full', docs/alerts.md), not left unmentioned:
    the archive probe sees no problem and the waiting line counts as an outage told
    elsewhere."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a private tmpfs")
    mnt, root = tmp_path / "small", tmp_path / "root"
    mnt.mkdir()
    root.mkdir()
    shell = 'mount -t tmpfs -o size=1m nbankd-test "$1" && shift && exec "$@"'
    argv = ["unshare", "-m", "sh", "-c", shell, "sh", str(mnt)]
    argv += [sys.executable, "-c", SCRIPT, str(mnt), str(root), str(TESTS)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["state"], out["attempts"]) == ("claimed", 1)  # waits, nothing partial left
    assert out["code"] == "archive-unavailable" and "No space left" in out["message"]
    assert out["staging"] == []
    assert out["told"], (
        f"nothing is told of an input waiting on a full archive (status: {out['degraded']}; "
        f"archive problem: {out['archive_problem']})"
    )


def test_the_staged_copy_published_is_the_file_the_copy_created(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy is written into the very file staging created (not whatever holds its
    name when it is opened again): a member of the lab group, who may write in the
    group-writable staging/, renaming a longer file of theirs over the new name never
    makes the daemon archive other bytes than the input's and remove the input."""
    assert os.stat(env.archive.staging_dir).st_mode & 0o020  # group-writable, as nbank's
    data = os.urandom(50_000)
    item = env.until(env.drop("rec.dat", data, verify=False), State.CLAIMED)
    real = staging._create_staged

    def rival_wins(archive: object, name: str, *, directory: bool) -> tuple[Path, int | None]:
        path, fd = real(archive, name, directory=directory)  # type: ignore[arg-type]
        planted = env.archive.staging_dir / "theirs"  # the rival's file, writable by all
        planted.write_bytes(b"\0" * 100_000)
        planted.chmod(0o666)
        os.rename(planted, path)  # just after the creation, before the copy
        return path, fd

    with monkeypatch.context() as race:
        race.setattr(staging, "_create_staged", rival_wins)
        item = env.step(item, Step.STAGE)
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and item.sha1 == hashlib.sha1(data).hexdigest()
    assert not (env.inbox / ".nbank" / item.token).exists()  # the input is gone
    [stored] = [p for p in env.archive.resources_dir.rglob("*") if p.is_file()]
    assert stored.read_bytes() == data, (
        f"deposited and the input removed, but the stored file holds "
        f"{stored.stat().st_size} bytes, not the input's {len(data)}"
    )


# --- guards (pass today): what held up -------------------------------------------------


def test_guard_an_input_rewritten_in_place_during_the_overlapped_copy_goes_back_whole(
    env: Env,
) -> None:
    """GUARD (passes): a large input (overlapped copy) whose first block is rewritten in
    place half way through its copy, its size kept and its mtime set back, is never
    staged as a mixed copy: it goes back to the inbox whole, with its new bytes."""
    data = bytearray(os.urandom(staging.OVERLAP_FROM + (8 << 20)))
    item = env.until(env.drop("big.dat", bytes(data)), State.CLAIMED)
    claimed = env.inbox / ".nbank" / item.token
    before = claimed.stat()
    rewritten = [False]

    def writer_strikes() -> None:  # the worker's beat, called as each block is copied
        if rewritten[0]:
            return
        rewritten[0] = True
        with open(claimed, "r+b") as f:  # as a program re-saving the file's header
            f.write(b"\xff" * 4096)
        os.utime(claimed, ns=(before.st_atime_ns, before.st_mtime_ns))
        data[:4096] = b"\xff" * 4096

    env.steps.set_beat(writer_strikes)
    try:
        item = env.step(item, Step.STAGE)
    finally:
        env.steps.set_beat(None)
    assert rewritten[0]
    assert (item.state, item.error_code) == (State.RETURNING, "changed")
    assert list(env.archive.staging_dir.iterdir()) == []
    item = env.step(item, Step.PUT_BACK)
    assert (env.inbox / "big.dat").read_bytes() == bytes(data)
    assert env.stored() == []
