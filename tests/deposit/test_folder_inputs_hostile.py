"""Hostile review of folder inputs (``directories: resources`` and ``zip``): how a
folder is settled, claimed, copied or zipped, hashed, published and removed from the
inbox, against an inbox writer who keeps a descriptor of their folder and an unlucky
lab.

Every test not labelled "guard" fails on the code it was written against and names
the behaviour expected once fixed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, wait_for
from fixtures.inplace_env import FolderEnv, make_env
from nbankd.archive.opening import create_archive
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import FINAL, State, advance, next_step


def _folder_daemon(daemon_factory: Any, **inbox_options: Any) -> DaemonHarness:
    """A daemon whose inbox deposits each top-level folder as one resource, into an
    archive that allows directories."""
    h: DaemonHarness = daemon_factory(inbox_options={"directories": "resources", **inbox_options})
    create_archive(h.archive, h.registry_address, allow_directories=True)
    return h


# --- a folder written to after it settled, before its claim --------------------------


def test_a_folder_written_to_after_it_settled_is_not_claimed_until_it_settles_again(
    daemon_factory: Any,
) -> None:
    """A folder input one of whose files is written to after the scan found the folder
    settled, before its claim (the lane busy: here held at after-journal-add), is not
    deposited until it has stayed unchanged for settle_seconds again (as a plain file)."""
    settle = 3.0
    h = _folder_daemon(daemon_factory, settle_seconds=settle, rescan_every="1h")
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        scratch = h.root / "session1"
        scratch.mkdir()
        (scratch / "notes.txt").write_bytes(b"session notes\n")
        with open(scratch / "spikes.dat", "wb") as f:  # the rig writes a block, closes
            f.write(b"block 1 of the recording\n")
        os.rename(scratch, h.inbox / "session1")
        wait_for(lambda: Path(f"{go}.reached").exists(), 20, "session1 to be journaled")
        with open(h.inbox / "session1" / "spikes.dat", "ab") as f:  # ... and goes on
            f.write(b"block 2 of the recording\n")
        appended = time.monotonic()
        go.touch()
        h.wait_settled(1, timeout=30)
        quiet = time.monotonic() - appended
        [receipt] = h.receipts()
        assert quiet >= settle, (
            f"session1 was deposited {quiet:.2f}s after its last write (settle_seconds "
            f"{settle:g}): the claim took a folder that changed after it settled; "
            f"receipt {receipt.get('size')} bytes"
        )
    finally:
        h.stop()


# --- the folder's removal after its deposit, by a writer who kept a descriptor --------
#
# A lab member's shell (or any program) whose working folder is their session folder
# keeps reaching it after the daemon moved it into the private work folder .nbank/:
# names are looked up from the working folder, not through .nbank/. This writer waits
# (inotify, on the folder itself) until the folder is moved the third time (into the
# inbox, the claim, then the release's rename to NAME.released: its identity checked,
# its copy deposited)
# and then swaps the sub-folder ``a`` with a link to a folder outside, back and forth.

_SWAPPER = r"""
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE, IN_MOVE_SELF = -100, 2, 0x800
target = sys.argv[1]
ino = libc.inotify_init1(0)
assert ino >= 0 and libc.inotify_add_watch(ino, b".", IN_MOVE_SELF) >= 0
print("watching", flush=True)
moves = 0
while moves < 3:  # into the inbox, the claim, the release
    buf = os.read(ino, 4096)
    while buf:
        wd, mask, cookie, n = struct.unpack_from("iIII", buf)
        moves += bool(mask & IN_MOVE_SELF)
        buf = buf[16 + n:]
os.symlink(target, "alink")
swaps, deadline = 0, time.monotonic() + 10
while time.monotonic() < deadline:
    if libc.renameat2(AT_FDCWD, b"a", AT_FDCWD, b"alink", RENAME_EXCHANGE) != 0:
        if ctypes.get_errno() == 2:  # removed: the release is over
            break
    else:
        swaps += 1
print(swaps)
"""


def test_releasing_a_folder_never_changes_modes_outside_it(
    daemon_factory: Any, unpriv_user: Any, other_user: Any
) -> None:
    """Removing a deposited folder from the work folder never changes anything outside
    it: a sub-folder its writer swaps for a link to another user's folders meanwhile
    (from the descriptor of their working folder) leads no chmod there."""
    import subprocess
    import sys

    h = _folder_daemon(daemon_factory, settle_seconds=0.5)
    outside = h.root / "outside"
    names = [f"d{i:04d}" for i in range(1500)]
    for name in names:  # another user's private folders, read-only to their owner
        (outside / name).mkdir(parents=True)
        os.chown(outside / name, other_user.uid, other_user.gid)
        (outside / name).chmod(0o500)
    rec = h.root / "rec"
    (rec / "a").mkdir(parents=True)
    (rec / "data.bin").write_bytes(b"a recording\n" * 100)
    for name in names:
        (rec / "a" / name).mkdir()
    for path in [rec, *rec.rglob("*")]:
        os.chown(path, unpriv_user.uid, unpriv_user.gid)
    h.start()
    swapper = subprocess.Popen(
        unpriv_user.argv([sys.executable, "-c", _SWAPPER, str(outside)]),
        cwd=rec,
        env=unpriv_user.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == "watching\n", swapper.stderr.read()
        os.rename(rec, h.inbox / "rec")
        h.wait_settled(1, timeout=120)
        out, err = swapper.communicate(timeout=60)
    finally:
        if swapper.poll() is None:
            swapper.kill()
            swapper.wait()
        h.stop()
    changed = sorted(n for n in names if (outside / n).stat().st_mode & 0o777 != 0o500)
    assert changed == [], (
        f"the release of folder rec chmod-ed {len(changed)} of {len(names)} folders "
        f"outside it, through a sub-folder swapped for a link (first: {changed[:3]}; "
        f"{out.strip()} swaps) {err[-500:]}"
    )


# --- folders the walk cannot hash or copy: rejected, never retried for ever ----------


def _drive(env: FolderEnv, item: Item, steps: int = 40) -> tuple[Item, list[str]]:
    """Runs the item's steps (backoff ignored) until it ends or ``steps`` ran; returns
    it and the outcome of each step."""
    seen: list[str] = []
    for _ in range(steps):
        if item.state in FINAL:
            break
        step = next_step(item.progress, float("inf"))
        assert step is not None, item
        item, outcome = env.steps.run(item, step)
        seen.append(f"{step}: {outcome.kind} {outcome.code} {(outcome.message or '')[:120]}")
        item = env.journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))
    return item, seen


@pytest.fixture(params=["copy", "rename"])
def copy_or_rename(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    env = make_env(tmp_path / "data", tmp_path / "state", placement=request.param)
    yield env
    env.journal.close()
    env.registry.close()


def test_a_folder_holding_a_name_that_is_not_utf8_is_rejected_whole(
    copy_or_rename: FolderEnv,
) -> None:
    """A folder input holding a file whose name is not UTF-8 (no neurobank folder hash
    covers it) is rejected with a reason naming it, its bytes kept whole in rejected/,
    not retried for ever as an internal error from the work folder."""
    env = copy_or_rename
    item, _ = env.drop_folder("rec1", files={"a.dat": b"first file"})
    with open(os.path.join(os.fsencode(env.inbox / "rec1"), b"caf\xe9.dat"), "wb") as f:
        f.write(b"latin-1 named file")
    item, seen = _drive(env, item)
    assert item.state is State.REJECTED, (
        f"a folder holding a non-UTF-8 name ended {item.state} {item.error_code}: {seen[-3:]}"
    )
    kept = os.path.join(os.fsencode(env.inbox / "rejected" / "rec1"), b"caf\xe9.dat")
    with open(kept, "rb") as f:
        assert f.read() == b"latin-1 named file"


def _nest(folder: Path, depth: int) -> None:
    """Makes ``depth`` nested sub-folders ``d`` in ``folder`` (from descriptors: the
    path grows past what pathlib recurses over) with a file at the bottom."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("leaf.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, b"deepest file")
        os.close(out)
    finally:
        os.close(fd)


def _unnest(root: Path) -> None:
    """Moves every sub-folder ``d`` below ``root`` up to ``root`` itself, one level at a
    time, so that nothing is left deeper than ``shutil.rmtree`` (pytest's clean-up of
    old temporary folders, in every later session) can recurse."""
    stack, moved = [root], 0
    while stack:
        folder = stack.pop()
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = folder / name
            if not path.is_dir() or path.is_symlink():
                continue
            if name == "d":
                path = path.rename(root / f"unnested{moved}")
                moved += 1
            stack.append(path)


@pytest.mark.parametrize(
    ("depth", "nofile"),
    [(1100, None), (600, 1024)],
    ids=["deeper-than-the-recursion-limit", "deeper-than-1024-descriptors"],
)
def test_a_folder_nested_too_deep_to_walk_is_rejected_not_retried_for_ever(
    tmp_path: Path, depth: int, nofile: int | None
) -> None:
    """A folder input nested deeper than the copy can walk (here 1,100 levels, and 600
    levels under systemd's default of 1,024 open files; paths well under PATH_MAX) is
    rejected with a reason, its bytes kept whole in rejected/: never left in the work
    folder retrying as an internal error or as the archive being unavailable."""
    import resource

    env = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        item, _ = env.drop_folder("rec1", files={"top.dat": b"top file"})
        _nest(env.inbox / "rec1", depth)
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, saved[1]))
        item, seen = _drive(env, item, steps=12)
    finally:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
            env.journal.close()
            env.registry.close()
            top_kept = (env.inbox / "rejected" / "rec1" / "top.dat").exists()
        finally:
            _unnest(tmp_path)  # whatever failed: never left for pytest's clean-up
    assert item.state is State.REJECTED, (
        f"a folder {depth} levels deep ended {item.state} {item.error_code}: {seen[-2:]}"
    )
    assert top_kept, "rejected, but not kept whole in rejected/"


# --- a folder the daemon's user can copy but never remove ----------------------------


def _item_errors(h: DaemonHarness) -> list[tuple[str, str | None]]:
    """(state, error code) of every item of the daemon's journal."""
    import sqlite3

    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return [(r[0], r[1]) for r in db.execute("SELECT state, error_code FROM items")]
    finally:
        db.close()


def test_a_folder_the_daemon_cannot_empty_is_never_deposited_and_left_in_the_work_folder(
    daemon_factory: Any, unpriv_user: Any, other_user: Any
) -> None:
    """Run as a service user, the daemon never records as deposited a folder it cannot
    then remove (a sub-folder only its owner may write, as ``cp -r`` under umask 022
    makes): the folder is either held whole in the inbox with an error, or deposited and
    removed from the work folder; never deposited (receipt written) and then kept in
    .nbank/ for ever, half removed, retried as the archive being unavailable."""
    from fixtures.daemon import work_entries

    h: DaemonHarness = daemon_factory(
        user=unpriv_user, inbox_options={"directories": "resources", "settle_seconds": 0.5}
    )
    create_archive(h.archive, h.registry_address, allow_directories=True)
    for path in [h.archive, *h.archive.rglob("*")]:
        os.chown(path, unpriv_user.uid, unpriv_user.gid)
    h.inbox.mkdir()
    os.chown(h.inbox, unpriv_user.uid, unpriv_user.gid)
    h.inbox.chmod(0o777)  # every lab member may drop folders here
    h.start()
    rec = h.root / "rec"
    (rec / "sub").mkdir(parents=True)
    (rec / "sub" / "data.bin").write_bytes(b"recorded samples\n" * 64)
    (rec / "notes.txt").write_bytes(b"session notes\n")
    for path in [rec, *rec.rglob("*")]:
        os.chown(path, other_user.uid, other_user.gid)
    rec.chmod(0o777)  # the folder itself may be moved into the work folder
    (rec / "sub").chmod(0o755)  # ... but only its owner may remove what sub holds
    os.rename(rec, h.inbox / "rec")
    work = h.inbox / ".nbank"

    def finished() -> bool:
        if h.receipts():
            return not work_entries(work)  # deposited: gone from the work folder
        held = any(code is not None for _state, code in _item_errors(h))
        return held and (h.inbox / "rec" / "sub" / "data.bin").exists()

    try:
        wait_for(finished, 30, "rec to be deposited and removed, or held in the inbox")
    except AssertionError:
        raise AssertionError(
            f"rec: receipts {[r['outcome'] for r in h.receipts()]}, items "
            f"{_item_errors(h)}, still in the work folder: "
            f"{[p.name for p in work_entries(work)]}"
        ) from None
    finally:
        h.stop()


# --- kill -9 as a folder is published, then a power loss -----------------------------
#
# A file's publish replayed after a kill links again (found there: the stub folder is
# fsynced again). A folder is moved into resources/ by rename: replayed, its source is
# gone and the copy found in place is taken as published, the stub folder never fsynced.


_KILLED_CHILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from deposit.test_folder_inputs_hostile import _reopened
from nbankd.deposit.lifecycle import State
env = _reopened(Path(sys.argv[2]), Path(sys.argv[3]))
item = env.journal.get(int(sys.argv[4]))
env.until(item, State.RECORDED)
"""


def _reopened(data_root: Path, state_root: Path) -> FolderEnv:
    """The FolderEnv of ``make_env(data_root, state_root)`` opened again, as a daemon
    restarted after a kill opens its folders."""
    from nbankd.archive import opening
    from nbankd.config.model import ArchiveConfig, InboxConfig
    from nbankd.deposit import inboxfs
    from nbankd.deposit.journal import Journal
    from nbankd.deposit.spec import InboxSpec
    from nbankd.deposit.steps import Steps
    from nbankd.names import WORK_DIR_NAME
    from nbankd.registry.factory import open_registry

    inbox = data_root / "inbox"
    registry = open_registry("embedded", embedded_db=state_root / "registry.sqlite3")
    archive = opening.open_archive(data_root / "arch")
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    config = InboxConfig(
        path=inbox, archive="arch", dtype="test-file", directories="resources", placement="rename"
    )
    spec = InboxSpec.of(
        config,
        ArchiveConfig(name="arch", path=archive.path),
        work_id=work_id,
        rejected_id=rejected_id,
    )
    journal = Journal(state_root / "journal.sqlite3")
    steps = Steps(
        journal=journal,
        registry=registry,
        inboxes=lambda key: spec if key == spec.key else None,
        receipts_dir=state_root / "receipts",
    )
    return FolderEnv(archive.path, inbox, registry, journal, spec, steps)


def _killed_after_publish_link(env: FolderEnv, item: Item) -> Item:
    """The item driven by another process killed (SIGKILL) right after its folder was
    moved into resources/ (for across_power_loss): the item as that process left it."""
    import signal
    import subprocess
    import sys

    tests = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_CHILD,
            str(tests),
            str(env.inbox.parent),
            str(env.steps.receipts_dir.parent),
            str(item.id),
        ],
        env={**os.environ, "NBANKD_CRASH_AT": "after-publish-link"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    again = env.journal.get(item.id)
    assert again is not None
    return again


def test_a_folder_whose_publish_was_killed_survives_a_power_loss_once_recorded(
    tmp_path: Path,
) -> None:
    """A folder input whose publish was killed (kill -9) right after the folder was moved
    into resources/, then finished by the next run up to its record, keeps every byte
    its receipt names through a power loss right after (ext4 on a loop device, the
    journal's running transaction dropped): the replayed publish makes the move durable
    before the record relies on it."""
    from fixtures.inplace_env import across_power_loss

    run = across_power_loss(
        tmp_path,
        verify=True,
        before="deposit.test_folder_inputs_hostile:_killed_after_publish_link",
    )
    assert run.deposit["state"] == str(State.RECORDED), run.deposit
    assert [r["id"] for r in run.receipts] == ["rec1"]
    assert run.read_back == run.deposit["sha1"], (
        f"recorded after a replayed publish, then lost on power loss: {run.read_back}"
    )


# --- nbankctl verify of a folder -----------------------------------------------------


def test_verify_of_a_folder_holding_a_name_that_is_not_utf8_reports_it_and_goes_on(
    tmp_path: Path,
) -> None:
    """``nbankctl verify FOLDER FILE`` where FOLDER holds a file whose name is not UTF-8
    reports FOLDER as not verifiable (exit 1), without a traceback, and still checks
    FILE."""
    import subprocess
    import sys

    from nbankd.registry.factory import open_registry

    state = tmp_path / "state"
    state.mkdir()
    open_registry("embedded", embedded_db=state / "registry.sqlite3").close()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"registry: embedded\nstate_dir: {state}\ncontrol_socket: {tmp_path / 'c.sock'}\n"
        "archives: []\ninboxes: []\n"
    )
    folder = tmp_path / "session"
    folder.mkdir()
    (folder / "ok.dat").write_bytes(b"plain name")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.dat"), "wb") as f:
        f.write(b"latin-1 name")
    other = tmp_path / "other.dat"
    other.write_bytes(b"another file")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("nbankctl")),
            "-c",
            str(config),
            "verify",
            str(folder),
            str(other),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert f"{other}:" in proc.stdout, proc.stdout
