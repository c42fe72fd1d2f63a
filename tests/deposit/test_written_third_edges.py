"""Third edges of "an input changed after its claim is never removed": the SHA-1 the
release (and the in-place publish) read again shows the worker alive as the copy did;
a folder a previous release was removing when it stopped (an upgrade mid-flight) is
finished, not returned as an input; a folder stored as its zip whose identity moved
without one byte changing is judged by its content, as a file is; an input the daemon
can no longer read at its release does not wait for ever; bytes written past the
recorded size are never taken for power-loss damage."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from test_zip_directories import drop_folder, use_zip

from fixtures.inplace_env import TESTS, FolderEnv, make_env
from fixtures.steps_env import Env
from nbankd.deposit.identity import IDENTITY_FIELDS
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step, advance


def _work(inbox: Path, token: str) -> Path:
    return inbox / ".nbank" / token


def _step(env: FolderEnv, item: Item, step: Step) -> Item:
    """Runs one step and journals the item's progress as the daemon does."""
    item, outcome = env.steps.run(item, step)
    return env.journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))


# -- the release's second read of a large input shows the worker alive ---------------


def test_the_release_reading_a_renumbered_input_again_beats_the_workers_liveness(
    env: Env,
) -> None:
    """A recorded input whose ctime moved (a mode set through its descriptor, an SSHFS
    remount renumbering it) is read again whole at its release to compare its SHA-1.
    That read beats the worker's liveness block by block, as the stage step's copy of
    the same file does: a recording of hundreds of GB read without a beat for longer
    than the wedge time (15 min) stops the watchdog pings, systemd restarts the daemon,
    and the release reads it again from the start, for ever."""
    data = os.urandom(3 * (4 << 20) + 1000)  # four blocks of the hashing buffer
    beats: list[float] = []
    env.steps.set_beat(lambda: beats.append(time.monotonic()))
    item = env.until(env.drop("long-session.dat", data), State.RECORDED)
    assert item.state is State.RECORDED, (item.state, item.error_code, item.error_message)
    staged_beats = len(beats)
    assert staged_beats >= 4  # the stage step's copy: one beat a block at least
    os.chmod(_work(env.inbox, item.token), 0o640)  # ctime moves, not one byte
    beats.clear()
    item = env.step(item, Step.RELEASE)
    assert (item.state, item.error_code) == (State.DONE, None)  # read again, same SHA-1
    assert len(beats) >= 4, (
        f"the release read the {len(data)}-byte input again whole with {len(beats)} "
        f"liveness beat(s) (its copy at the stage step: {staged_beats}): a large input "
        "outlasts the wedge time and the watchdog restarts the daemon, release after release"
    )


# -- an upgrade while the previous release was removing a deposited folder -------------


def test_a_folder_the_previous_release_left_half_removed_is_finished_not_put_back(
    tmp_path: Path,
) -> None:
    """The previous release removed a deposited folder in place (shutil.rmtree, no
    rename first) and journaled its identity without a boot id. Stopped part way through
    that removal (SIGKILL at the end of a stop timeout during the upgrade's restart, an
    OOM kill), it leaves the tree with some files gone. This release, finishing that
    RECORDED item, must finish the removal: the remnant is the daemon's own half-removed
    tree, not a writer's version, and going back to the inbox it is deposited again as
    a new resource missing files."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    try:
        files = {f"f{i}.dat": os.urandom(4096) for i in range(8)}
        item, _ = env.drop_folder("session7", files=files)
        item = env.until(item, State.RECORDED)
        assert item.state is State.RECORDED, (item.error_code, item.error_message)
        # the journal as the previous release wrote it: the five fields, no boot id
        legacy = {k: v for k, v in json.loads(item.identity or "{}").items() if k != "boot"}
        assert sorted(legacy) == sorted(IDENTITY_FIELDS)
        item = env.journal.save(replace(item, identity=json.dumps(legacy)))
        work = _work(env.inbox, item.token)
        names = sorted(os.listdir(work))
        for name in names[: len(names) // 2]:  # what its rmtree had unlinked when killed
            os.unlink(work / name)
        item = _step(env, item, Step.RELEASE)
        assert item.state is not State.RETURNING, (
            "the previous release's half-removed folder goes back to the inbox as an "
            f"input: {item.error_code}: {item.error_message}"
        )
        assert not (env.inbox / "session7").exists()
    finally:
        env.journal.close()
        env.registry.close()


# -- a folder stored as its zip: an identity change that is no content change --------


def test_a_zipped_folder_whose_member_mode_changed_after_its_record_is_removed(
    env: Env,
) -> None:
    """A folder deposited as its canonical zip (which stores every member as
    rw-r--r--, whatever its mode) whose member's mode changes after the record (ctime
    moves, not one byte, not one byte of its zip either) is the input deposited, as a
    file whose mode changed is: removed, never put back to be deposited a second time
    (or, with automatic identifiers, rejected as a duplicate of itself)."""
    use_zip(env, auto_id=True)
    files = {"a.dat": os.urandom(10_000), "sub/b.dat": os.urandom(7_000)}
    item = env.until(drop_folder(env.journal, env.spec, "zsess", files), State.RECORDED)
    assert item.state is State.RECORDED and item.zipped, (item.state, item.error_message)
    os.chmod(_work(env.inbox, item.token) / "a.dat", 0o600)
    item = env.until(item, State.DONE)
    assert (item.state, item.error_code) == (State.DONE, None), (
        f"a zipped folder with one member's mode changed after its record: {item.state} "
        f"({item.error_code}: {item.error_message})"
    )
    assert not (env.inbox / "zsess").exists()


# -- an input the daemon can no longer read when it is released ----------------------

_UNREADABLE = r"""
import json, os, secrets, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fixtures.inplace_env import make_env
from nbankd.deposit.lifecycle import State, Step, advance

root = Path(sys.argv[1])
env = make_env(root / "data", root / "state", placement="copy")
path = env.inbox / "locked.dat"
path.write_bytes(os.urandom(50_000))
st = os.lstat(path)
item = env.journal.add(
    token=secrets.token_hex(16), inbox=env.spec.key, relpath=b"locked.dat", kind="file",
    archive=env.spec.archive_name, archive_path=str(env.spec.archive_path),
    placement="copy", verify=1, seen_identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
    created=0.0, updated=0.0)
item = env.until(item, State.RECORDED)
assert item.state is State.RECORDED, (item.state, item.error_code, item.error_message)
work = env.inbox / ".nbank" / item.token
os.chmod(work, 0)  # its mode no longer lets the daemon's user read it: ctime moves
seen = []
for _ in range(3):  # the release, and its next attempts after their backoff
    item, outcome = env.steps.run(item, Step.RELEASE)
    item = env.journal.save(item.with_progress(advance(item.progress, Step.RELEASE, outcome, 0.0)))
    seen.append([str(item.state), item.error_code])
    if item.state is not State.RECORDED:
        break
print(json.dumps(seen))
"""


def test_an_input_unreadable_at_its_release_does_not_wait_for_ever(
    unpriv_user: Any, user_tmp_path: Path
) -> None:
    """The daemon's user (here unprivileged: root reads every file) deposits a file;
    after its record the file's mode stops letting that user read it (its owner's
    chmod go-r with the daemon in its group; here mode 000): its ctime moved, so the
    release wants its SHA-1 and cannot read it. The release must end (removed, as
    before this check, or put back whole: 'cannot tell'), not retry for ever with an
    error blaming the archive ('archive-unavailable') while the input stays hidden in
    the work folder."""
    proc = unpriv_user.python(_UNREADABLE, user_tmp_path, TESTS)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen[-1][0] in ("done", "returning"), (
        f"release attempts: {seen}: the input stays in .nbank/ and every attempt blames the archive"
    )


# -- a change across a restart that no power loss can make ---------------------------


def test_an_input_grown_after_a_claim_of_an_earlier_boot_is_not_removed(env: Env) -> None:
    """The power-loss rule excuses a change found after a restart of the machine (the
    rig's unflushed bytes lost: the input came back shorter, or with other bytes at
    the size recorded). A power loss never makes a file longer than the claim saw it:
    bytes past the recorded size were written after the claim and reached the disk,
    a writer's (an NFS client the daemon cannot see, appending while the release kept
    failing). Such an input must go back whole, not be removed as damage."""
    first, more = os.urandom(30_000), os.urandom(8_000)
    item = env.until(env.drop("grown.dat", first), State.RECORDED)
    assert item.state is State.RECORDED, (item.state, item.error_code, item.error_message)
    claimed = json.loads(item.identity or "{}")
    assert claimed["boot"]
    # claimed in an earlier boot of the machine (as the power-loss tests journal it)
    item = env.journal.save(replace(item, identity=json.dumps({**claimed, "boot": "earlier"})))
    with open(_work(env.inbox, item.token), "ab") as writer:
        writer.write(more)
    item = env.step(item, Step.RELEASE)
    kept = [
        p.stat().st_size
        for p in (env.inbox / "grown.dat", _work(env.inbox, item.token))
        if p.exists()
    ]
    assert item.state is State.RETURNING and kept == [len(first) + len(more)], (
        f"state {item.state}: {len(more)} bytes written past the recorded size were "
        f"removed as power-loss damage (kept: {kept})"
    )
