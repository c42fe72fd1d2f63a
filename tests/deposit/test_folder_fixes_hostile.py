"""Second hostile review of today's fixes for folder inputs: the removal of a deposited
folder from descriptors (treeremoval), the iterative copy and hash walk and its limit
of 64 levels, the tree journaled with the intent and compared at claim, and the
replayed publish of a folder.

Every test not labelled "guard" fails on the code it was written against and names
the behaviour expected once fixed. A writer acting at one precise instant (between
two system calls of the daemon) is played by wrapping that system call as seen from
the module under test; nothing of nbankd's own logic is replaced.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.inplace_env import make_env
from fixtures.steps_env import Env
from nbankd.archive import treeremoval
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import FINAL, State, Step, advance, next_step

# --- helpers -----------------------------------------------------------------------


def _drive(steps: Any, journal: Journal, item: Item, limit: int = 14) -> tuple[Item, list[str]]:
    """Runs the item's steps (backoff ignored) until it ends or ``limit`` ran; returns
    it and the outcome of each step."""
    seen: list[str] = []
    for _ in range(limit):
        if item.state in FINAL:
            break
        step = next_step(item.progress, float("inf"))
        assert step is not None, item
        item, outcome = steps.run(item, step)
        seen.append(f"{step}: {outcome.kind} {outcome.code} {(outcome.message or '')[:160]}")
        item = journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))
    return item, seen


def _chain(folder: Path | str, names: list[str], leaf: bytes = b"deepest file") -> None:
    """Makes the chain of nested sub-folders ``names`` in ``folder`` (from descriptors:
    the path may grow past PATH_MAX) with a file ``leaf.dat`` at the bottom."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("leaf.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, leaf)
        os.close(out)
    finally:
        os.close(fd)


def _unnest(root: Path) -> None:
    """Moves every sub-folder ``d`` below ``root`` up to ``root``, one level at a time,
    so that nothing is left deeper than shutil.rmtree (pytest's clean-up) recurses."""
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


def _top_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


# --- remove_tree_at: cost, writers refilling it, sub-folders moved out ---------------


def test_removing_a_folder_of_many_sub_folders_lists_each_entry_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing a deposited folder holding N sub-folders (one per trial, say) lists
    O(N) entries in all, as shutil.rmtree did: never the whole folder again after each
    sub-folder, whose N^2 cost keeps a worker silent past the 900 s wedge limit once a
    folder holds some 80,000 sub-folders (8,000 already take 14 s instead of 1 s)."""
    work = tmp_path / "work"
    (work / "gone").mkdir(parents=True)
    n = 1500
    for i in range(n):
        (work / "gone" / f"trial{i:05d}").mkdir()
    listed = [0]
    real = os.listdir

    def counting(path: Any = None) -> list[Any]:
        names = real(path) if path is not None else real()
        listed[0] += len(names)
        return names

    monkeypatch.setattr(treeremoval.os, "listdir", counting)
    fd = _top_fd(work)
    try:
        treeremoval.remove_tree_at(fd, "gone")
    finally:
        os.close(fd)
        monkeypatch.undo()
    assert not (work / "gone").exists()
    assert listed[0] <= 10 * n, (
        f"removing a folder of {n} empty sub-folders listed {listed[0]} entries "
        f"({listed[0] / n:.0f} per sub-folder): quadratic in the number of sub-folders"
    )


def test_a_writer_refilling_a_released_folder_with_sub_folders_is_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer who kept a descriptor of a deposited folder and makes a new sub-folder
    in it each time the daemon removed one is given up on (an error, as for a writer
    refilling it with files) after a bounded number of refills: the removal never
    loops for as long as the writer goes on, deleting each new folder (data never
    deposited) as it comes."""
    work = tmp_path / "work"
    gone = work / "gone"
    (gone / "s0").mkdir(parents=True)
    (gone / "data.bin").write_bytes(b"recorded samples\n")
    top_ino = os.stat(gone).st_ino
    cap = 5 * treeremoval._REFILLS
    made = [0]
    real_rmdir = os.rmdir

    def rmdir_then_writer_adds_one(path: Any, *, dir_fd: int | None = None) -> None:
        real_rmdir(path, dir_fd=dir_fd)
        if dir_fd is not None and os.fstat(dir_fd).st_ino == top_ino and made[0] < cap:
            made[0] += 1  # the writer's next folder, through its own descriptor
            os.mkdir(f"s{made[0]}", dir_fd=dir_fd)

    monkeypatch.setattr(treeremoval.os, "rmdir", rmdir_then_writer_adds_one)
    fd = _top_fd(work)
    raised: BaseException | None = None
    try:
        treeremoval.remove_tree_at(fd, "gone")
    except OSError as err:
        raised = err
    finally:
        os.close(fd)
        monkeypatch.undo()
    assert raised is not None and made[0] < cap, (
        f"the removal went on while the writer made {made[0]} new sub-folders (each "
        f"deleted as it came; {treeremoval._REFILLS} refills are the documented bound), "
        f"ending only when the writer stopped: raised {raised!r}"
    )


def test_a_sub_folder_its_writer_moves_out_of_the_folder_being_removed_keeps_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sub-folder its writer moves out of the deposited folder (``mv a ~/keep`` from
    a shell whose working folder is in it) after the removal opened it, before it
    listed it, keeps its files where it now is: nothing outside the folder being
    removed is deleted (guarantee 7), as the docstring of remove_tree_at says."""
    work = tmp_path / "work"
    (work / "gone" / "a").mkdir(parents=True)
    for i in range(3):
        (work / "gone" / "a" / f"take{i}.dat").write_bytes(b"the lab member's data %d\n" % i)
    home = tmp_path / "home"
    home.mkdir()
    a_ino = os.stat(work / "gone" / "a").st_ino
    real_listdir = os.listdir
    moved = [False]

    def writer_moves_a_out_first(path: Any = None) -> list[Any]:
        if isinstance(path, int) and not moved[0] and os.fstat(path).st_ino == a_ino:
            moved[0] = True
            os.rename(work / "gone" / "a", home / "keep")
        return real_listdir(path) if path is not None else real_listdir()

    monkeypatch.setattr(treeremoval.os, "listdir", writer_moves_a_out_first)
    fd = _top_fd(work)
    try:
        treeremoval.remove_tree_at(fd, "gone")
    finally:
        os.close(fd)
        monkeypatch.undo()
    assert moved[0]
    left = sorted(os.listdir(home / "keep"))
    assert left == ["take0.dat", "take1.dat", "take2.dat"], (
        f"the removal of work/gone deleted files in {home / 'keep'}, outside it: left {left}"
    )


# --- the limit of 64 levels, and deep trees, across the walks ------------------------


def _zip_env(env: Env) -> Env:
    from dataclasses import replace

    spec = replace(env.spec, config=replace(env.spec.config, directories="zip"))
    env.spec = spec
    env.steps.inboxes = lambda key: spec if key == spec.key else None
    return env


def _journal_folder(journal: Journal, spec: Any, name: str) -> Item:
    st = os.lstat(spec.path / name)
    return journal.add(
        token=secrets.token_hex(16),
        inbox=spec.key,
        relpath=os.fsencode(name),
        kind="dir",
        archive=spec.archive_name,
        archive_path=str(spec.archive_path),
        placement=spec.placement,
        verify=1,
        seen_identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
        created=time.time(),
        updated=0.0,
    )


def test_zipping_a_folder_nested_too_deep_to_walk_is_rejected_not_retried_for_ever(
    env: Env, tmp_path: Path
) -> None:
    """With ``directories: zip``, a folder nested deeper than the zip's walk can go
    (1,100 levels, paths well under PATH_MAX) is rejected with a reason, kept whole in
    rejected/, as the copy's walk now does: never retried for ever as an internal
    error (RecursionError) from the work folder."""
    _zip_env(env)
    rec = env.inbox / "rec1"
    rec.mkdir()
    (rec / "top.dat").write_bytes(b"top file")
    try:
        _chain(rec, ["d"] * 1100)
        item = _journal_folder(env.journal, env.spec, "rec1")
        item, seen = _drive(env.steps, env.journal, item, limit=10)
        kept = (env.inbox / "rejected" / "rec1" / "top.dat").exists()
    finally:
        env.journal.close()
        env.registry.close()
        _unnest(tmp_path)
    assert item.state is State.REJECTED, (
        f"a zipped folder 1,100 levels deep ended {item.state} {item.error_code}: {seen[-3:]}"
    )
    assert kept


def test_a_folder_70_levels_deep_gets_the_same_verdict_zipped_as_copied(
    env: Env, tmp_path: Path
) -> None:
    """A folder 70 levels deep (more than the 64 the copy, the writers check and the
    claim's removability check walk) is treated alike whether the inbox copies
    folders or zips them: today the copy rejects it and the zip deposits it, its
    levels below 64 never looked at by the claim's check that the daemon can empty it
    nor by the check for programs still writing."""
    copied_env = make_env(tmp_path / "copy", tmp_path / "copy-state", placement="copy")
    try:
        item, _ = copied_env.drop_folder("rec1", files={"top.dat": b"top"})
        _chain(copied_env.inbox / "rec1", ["d"] * 70)
        copied, copy_seen = _drive(copied_env.steps, copied_env.journal, item)
    finally:
        copied_env.journal.close()
        copied_env.registry.close()
    _zip_env(env)
    rec = env.inbox / "rec1"
    rec.mkdir()
    (rec / "top.dat").write_bytes(b"top")
    _chain(rec, ["d"] * 70)
    try:
        item = _journal_folder(env.journal, env.spec, "rec1")
        zipped, zip_seen = _drive(env.steps, env.journal, item)
    finally:
        env.journal.close()
        env.registry.close()
    assert copied.state is zipped.state, (
        f"copied: {copied.state} {copied.error_code} ({copy_seen[-1]}); "
        f"zipped: {zipped.state} {zipped.error_code} ({zip_seen[-1]})"
    )


def test_a_registered_folder_deeper_than_64_levels_can_be_copied_to_another_archive(
    tmp_path: Path,
) -> None:
    """A folder resource already registered (deposited by nbank, which has no depth
    limit, or by nbankd before today) 70 levels deep is copied into another archive
    (``nbankctl copy``), as its dry run says it can: never refused with "flatten the
    folder, then deposit it again", which would change its registered hash."""
    from nbank.util import hash_directory

    from nbankd.archive import opening
    from nbankd.registry.factory import open_registry
    from nbankd.transfer import receive

    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    try:
        dest = opening.create_archive(tmp_path / "dest", registry.url, allow_directories=True)
    finally:
        registry.close()
    source = tmp_path / "src" / "resources" / "re" / "rec1"
    source.mkdir(parents=True)
    (source / "top.dat").write_bytes(b"top")
    _chain(source, ["d"] * 70)
    registered = hash_directory(source)
    dry = receive.copy_resource(dest, source, "rec1", registered, dry_run=True)
    assert dry.sha1 == registered and dry.verified
    try:
        copied = receive.copy_resource(dest, source, "rec1", registered)
    except Exception as err:  # the refusal is the finding
        pytest.fail(f"the dry run said OK, the copy refused: {type(err).__name__}: {err}")
    assert copied.sha1 == registered and copied.path is not None


def _long_names(count: int) -> list[str]:
    """``count`` folder names of 200 characters: a path past PATH_MAX in ~21 levels."""
    return [f"{i:02d}" + "x" * 198 for i in range(count)]


def test_a_replayed_folder_publish_is_taken_as_published_when_its_paths_pass_path_max(
    tmp_path: Path,
) -> None:
    """A folder publish replayed after a kill right after its rename (the staged copy
    gone, the folder in resources/) is taken as published when the stored folder
    holds the recorded bytes, even where its deepest paths are longer than PATH_MAX
    under resources/ (they were not under the shorter inbox, so it settled and was
    copied from descriptors): never a ResourceExists ("choose another identifier",
    permanent) for the folder it placed itself, because the path-based hash skipped
    the folders it could not list."""
    from nbankd.archive import durable, opening
    from nbankd.archive.verify import stored_sha1
    from nbankd.registry.factory import open_registry

    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    try:
        archive = opening.create_archive(tmp_path / "arch", registry.url, allow_directories=True)
    finally:
        registry.close()
    target = archive.stored_file("rec1", "rec1")
    target.mkdir(parents=True)  # as the killed run's rename left it
    (target / "top.dat").write_bytes(b"top")
    _chain(target, _long_names(22))
    sha1 = stored_sha1(target)  # what the stage step hashed from descriptors
    assert sha1 is not None
    try:
        published = durable.publish(
            archive, archive.staging_dir / "nbankd-staged-rec1", target, sha1=sha1, id="rec1"
        )
    except Exception as err:  # the refusal is the finding
        pytest.fail(f"the replayed publish of its own folder raised {type(err).__name__}: {err}")
    assert published.path == target and not published.created


def test_verify_of_an_intact_folder_whose_paths_pass_path_max_never_reports_a_mismatch(
    tmp_path: Path,
) -> None:
    """``nbankctl verify`` of a stored folder holding the registered bytes, whose
    deepest paths are longer than PATH_MAX, reports it OK (or, at worst, not
    verifiable): never "FAILED to match record", which tells the lab its archived
    copy is corrupt because the hash silently left out the folders it could not list
    (as it does for any sub-folder the user may not read)."""
    from nbankctl.locate_cmds import _verify_one
    from nbankd.archive.verify import stored_sha1
    from nbankd.registry.factory import open_registry

    folder = tmp_path / "resources" / "re" / "rec1"
    folder.mkdir(parents=True)
    (folder / "top.dat").write_bytes(b"top")
    _chain(folder, _long_names(22))
    sha1 = stored_sha1(folder)
    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    try:
        registry.add_datatype("test-file")
        registry.add_resource(dtype="test-file", archive=None, name="rec1", sha1=sha1)
        _ok, result = _verify_one(registry, folder, "rec1")
    finally:
        registry.close()
    assert result["status"] in ("ok", "unreadable", "not-verifiable"), result


def test_an_empty_sub_folder_named_in_latin1_does_not_reject_its_folder(
    tmp_path: Path,
) -> None:
    """A folder input holding an empty sub-folder whose name is not UTF-8 (left by an
    old Samba share) is deposited with neurobank's hash of it (folders contribute
    nothing to that hash, so nbank hashes it, and the zip takes it): only a *file* so
    named has no neurobank hash, so only that rejects the folder."""
    from nbank.util import hash_directory

    env = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    try:
        item, _ = env.drop_folder("rec1", files={"a.dat": b"first file", "sub/b.dat": b"b"})
        os.mkdir(os.path.join(os.fsencode(env.inbox / "rec1"), b"caf\xe9"))
        expected = hash_directory(env.inbox / "rec1")
        item, seen = _drive(env.steps, env.journal, item)
    finally:
        env.journal.close()
        env.registry.close()
    assert item.state is State.DONE and item.sha1 == expected, (
        f"ended {item.state} {item.error_code}: {seen[-2:]}"
    )


# --- the tree journaled with the intent, compared at claim ---------------------------


def test_an_unchanged_folder_near_path_max_is_claimed_as_it_settled(tmp_path: Path) -> None:
    """A folder that settled in an inbox with a short path (here /tmp/iXXXXXXXX, as
    /srv/in or /data/in) is claimed when nothing in it changed, even where its
    deepest folder's path is just under PATH_MAX there: the claim's summary of the
    tree (walked from descriptors, whatever the inbox's path) must not find that folder
    "unreadable" and so take the folder for changed, leaving it in the inbox to settle
    and be refused again, for ever."""
    from nbankd.archive import opening
    from nbankd.config.model import ArchiveConfig, InboxConfig
    from nbankd.deposit import inboxfs
    from nbankd.deposit.identity import tree_seen
    from nbankd.deposit.spec import InboxSpec
    from nbankd.deposit.steps import Steps
    from nbankd.names import WORK_DIR_NAME
    from nbankd.registry.factory import open_registry
    from nbankd.watch.scan import _directory_resource

    inbox = Path(tempfile.mkdtemp(prefix="i", dir="/tmp"))
    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        assert len(str(inbox)) < len("/proc/self/fd/10")
        archive = opening.create_archive(tmp_path / "arch", registry.url, allow_directories=True)
        registry.add_datatype("test-file")
        registry.add_archive("arch", "neurobank", str(archive.path))
        work_id, rejected_id = inboxfs.prepare_folders(
            inbox, work=WORK_DIR_NAME, rejected="rejected"
        )
        spec = InboxSpec.of(
            InboxConfig(path=inbox, archive="arch", dtype="test-file", directories="resources"),
            ArchiveConfig(name="arch", path=archive.path),
            work_id=work_id,
            rejected_id=rejected_id,
        )
        steps = Steps(
            journal=journal,
            registry=registry,
            inboxes=lambda key: spec if key == spec.key else None,
            receipts_dir=tmp_path / "receipts",
        )
        rec = inbox / "rec1"
        rec.mkdir()
        (rec / "top.dat").write_bytes(b"top")
        # the deepest folder's path in the inbox: 4,094 characters (PATH_MAX is 4,096)
        names = _long_names(19)
        prefix = len(str(rec)) + sum(len(n) + 1 for n in names)
        names.append("z" * (4094 - prefix - 1))
        _chain(rec, names)
        entry = _directory_resource(str(inbox), "rec1")  # as the scan found it settled
        assert entry is not None and entry.problem is None, entry
        seen = {"dev": entry.identity.dev, "ino": entry.identity.ino}
        seen["tree"] = tree_seen(entry.identity)  # as intents._intent journals it
        item = journal.add(
            token=secrets.token_hex(16),
            inbox=spec.key,
            relpath=b"rec1",
            kind="dir",
            archive="arch",
            archive_path=str(archive.path),
            placement="copy",
            verify=1,
            seen_identity=json.dumps(seen),
            created=time.time(),
            updated=0.0,
        )
        item, outcome = steps.run(item, Step.CLAIM)
    finally:
        journal.close()
        registry.close()
        import shutil

        shutil.rmtree(inbox, ignore_errors=True)
    assert outcome.kind == "ok", (
        f"the unchanged folder was not claimed: {outcome.kind} {outcome.code} {outcome.message}"
    )


# --- guards (pass today) ---------------------------------------------------------------


def test_guard_the_walks_hash_equals_nbanks_for_names_that_sort_differently_by_parts(
    tmp_path: Path,
) -> None:
    """Guard: the iterative walk's folder hash (copy and in place) is nbank's
    hash_directory for names whose order by path components differs from their order
    as strings ("a-b" < "a/b" < "a.b" as text), unicode, spaces and '=' in names, and
    a folder 64 levels deep (the most the walk accepts)."""
    from nbank.util import hash_directory

    from nbankd.archive import durable, opening
    from nbankd.registry.factory import open_registry

    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    try:
        archive = opening.create_archive(tmp_path / "arch", registry.url, allow_directories=True)
    finally:
        registry.close()
    rec = tmp_path / "rec"
    files = {
        "a-b": b"1",
        "a/b": b"2",
        "a.b": b"3",
        "a/b.c/d": b"4",
        "a b/x=y": b"5",
        "ñame/ü.wav": b"6",
        "Z": b"7",
        "a0": b"8",
        "empty": b"",
    }
    for rel, data in files.items():
        (rec / rel).parent.mkdir(parents=True, exist_ok=True)
        (rec / rel).write_bytes(data)
    (rec / "deep").mkdir()
    _chain(rec / "deep", ["d"] * 63)
    expected = hash_directory(rec)
    in_place, _ = durable.hash_tree(archive, rec)
    staged = durable.stage_copy_tree(archive, rec, ".nbankd-staged-guard")
    assert in_place == staged.sha1 == expected
