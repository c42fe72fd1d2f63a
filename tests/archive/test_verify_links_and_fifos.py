"""Reading a stored folder back from storage (from directory descriptors) with what
folders stored by older neurobank releases may hold, and what a writer may swap in.

neurobank before 0.13 (``store_resource``) moved a folder in, links and all, with no
check: a link to a sub-folder, or a link whose target is gone, may be there.
neurobank's own hash (``nbank.util.hash_directory``) leaves both out, and so does the
read-back: a re-drop of such a resource is already deposited, and ``tape prune``
verifies its copy. A file swapped for a FIFO between the walk's ``lstat`` and its
``open`` is refused, never waited on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbank.util import hash_directory

from fixtures.inplace_env import FolderEnv, make_env
from nbankd import errors, tape_prune
from nbankd.archive import durable, opening
from nbankd.archive.verify import stored_sha1
from nbankd.deposit.lifecycle import State
from nbankd.registry.factory import open_registry

FILES = {
    "data/take1.bin": b"first take" * 500,
    "data/take2.bin": b"second" * 700,
    "notes.txt": b"ok",
}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _older_neurobank_folder(resources: Path, id: str) -> Path:
    """Folder ``id`` filed in ``resources`` as neurobank 0.11 left it (the source
    folder moved in, its links with it): FILES, a link to its sub-folder ``data`` and
    a link whose target is gone."""
    stored = _write(resources / id[:2] / id, FILES)
    os.symlink("data", stored / "latest")
    os.symlink("/nonexistent/scratch/run3", stored / "scratch")
    return stored


def test_links_neurobank_leaves_out_are_left_out_of_the_read_back(tmp_path: Path) -> None:
    """A stored folder holding a link to a sub-folder and a dangling link reads back
    as neurobank's hash of it (as before 47281d9), not as ArchiveUnavailable."""
    archive = opening.create_archive(
        tmp_path / "arch", "http://127.0.0.1:1/neurobank/", allow_directories=True
    )
    stored = _older_neurobank_folder(archive.resources_dir, "rec1")
    assert stored_sha1(stored) == hash_directory(stored)


# -- a re-drop of such a resource ----------------------------------------------------


@pytest.fixture
def copy_env(tmp_path: Path) -> Iterator[FolderEnv]:
    """Deposit steps for an inbox of folder resources (``directories: resources``,
    copied) into an archive that allows them, with an embedded registry."""
    env = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    yield env
    env.journal.close()
    env.registry.close()


def test_redrop_of_an_older_neurobank_folder_with_links_is_already_deposited(
    copy_env: FolderEnv,
) -> None:
    """rec1, stored and registered by neurobank 0.11 with a link to a sub-folder and a
    dangling link, dropped again with the same files: already-deposited (as before
    47281d9), not a transient archive-unavailable retried for ever."""
    env = copy_env
    stored = _older_neurobank_folder(env.archive_root / "resources", "rec1")
    env.registry.add_resource(
        dtype="test-file", archive="arch", name="rec1", sha1=hash_directory(stored)
    )
    item, _files = env.drop_folder("rec1", files=FILES)
    item = env.until(item, State.DONE)
    assert item.state is State.DONE, (item.state, item.error_code, item.error_message)
    assert item.already


# -- tape prune ----------------------------------------------------------------------


def test_prune_verifies_a_copy_in_an_older_neurobank_archive_holding_links(
    tmp_path: Path,
) -> None:
    """Pruning rec1 and rec2 from ``here``, whose other copies are in ``there`` (rec1
    a folder neurobank 0.11 stored with a link to a sub-folder and a dangling link):
    both other copies verify against the registered SHA-1 and both local copies are
    deleted (as before 47281d9); the run is not aborted by ArchiveUnavailable."""
    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    try:
        registry.add_datatype("test-folder")
        here = opening.create_archive(tmp_path / "here", registry.url, allow_directories=True)
        there = opening.create_archive(tmp_path / "there", registry.url, allow_directories=True)
        registry.add_archive("here", "neurobank", str(here.path))
        registry.add_archive("there", "neurobank", str(there.path))
        theirs = _older_neurobank_folder(there.resources_dir, "rec1")
        ours = _write(here.resources_dir / "re" / "rec1", FILES)
        (there.resources_dir / "re" / "rec2").write_bytes(b"a file")
        (here.resources_dir / "re" / "rec2").write_bytes(b"a file")
        registry.add_resource(
            dtype="test-folder", archive="here", name="rec1", sha1=hash_directory(theirs)
        )
        registry.add_location("rec1", "there")
        registry.add_resource(
            dtype="test-folder",
            archive="here",
            name="rec2",
            sha1=hashlib.sha1(b"a file").hexdigest(),
        )
        registry.add_location("rec2", "there")
        summary = tape_prune.prune(registry, "here", ["rec1", "rec2"])
        assert summary.counts()["deleted"] == 2, summary
        assert not ours.exists() and not (here.resources_dir / "re" / "rec2").exists()
    finally:
        registry.close()


# -- a file swapped for a FIFO ---------------------------------------------------------


def test_a_file_swapped_for_a_fifo_mid_walk_does_not_block_the_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When ``z/data.bin`` of a stored folder is swapped for a FIFO right after the
    walk's ``lstat`` of it (a writer who kept a descriptor of the folder can), the
    read-back ends (an error or a mismatch) instead of blocking in ``open`` for ever."""
    archive = opening.create_archive(
        tmp_path / "arch", "http://127.0.0.1:1/neurobank/", allow_directories=True
    )
    src = _write(tmp_path / "rec1", {"a/data.bin": b"first" * 100, "z/data.bin": b"second" * 100})
    staged = durable.stage_copy_tree(archive, src, ".nbankd-rec1")
    target = archive.new_resource_path("rec1", "rec1")
    durable.publish(archive, staged.path, target, sha1=staged.sha1, id="rec1")
    z = target / "z"
    os.chmod(z, 0o755)  # the writer may change the folder
    fifo = z / "data.bin"
    real_stat = os.stat
    swapped: list[bool] = []

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        st = real_stat(path, *args, **kwargs)
        dir_fd = kwargs.get("dir_fd")
        if (
            not swapped
            and path == "data.bin"
            and dir_fd is not None
            and os.readlink(f"/proc/self/fd/{dir_fd}") == str(z)
        ):
            os.rename(fifo, target / "moved-away")
            os.mkfifo(fifo)
            swapped.append(True)
        return st

    monkeypatch.setattr(os, "stat", spy)
    ended: list[object] = []

    def read_back() -> None:
        try:
            ended.append(durable.verify_from_storage(target, staged.sha1))
        except errors.NbankdError as err:  # refusing the changed folder is fine
            ended.append(err)

    reader = threading.Thread(target=read_back, daemon=True)
    reader.start()
    reader.join(timeout=60)  # a bound on a hang (ms unloaded), not a synchronisation
    blocked = reader.is_alive()
    if blocked:  # let the reader go: a writer opens the FIFO, then closes it (EOF)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=30)
    monkeypatch.undo()
    assert swapped, "the walk never looked at z/data.bin"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not blocked, "the read-back blocked opening a FIFO swapped in after its lstat"
    assert ended and ended[0] is not True
