"""The work folder's token: a folder renumbered by a remount is still the daemon's,
a replacement is not."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbankd.deposit import folderproof
from nbankd.deposit.inboxfs import InboxFS, Tampered, prepare_folders, prove_folders
from nbankd.names import WORK_DIR_NAME


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    root.mkdir()
    return root


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.fixture
def private(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A folder only this user may use, and a descriptor of it."""
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    fd = _open(folder)
    yield folder, fd
    os.close(fd)


def _renumbered(folder_id: tuple[int, int]) -> tuple[int, int]:
    """The identity recorded before a remount that numbered the folder anew."""
    return folder_id[0], folder_id[1] + 1_000_003


def _prove(inbox: Path, work_id: tuple[int, int], rejected_id: tuple[int, int]) -> tuple[str, int]:
    return prove_folders(
        inbox, work=WORK_DIR_NAME, work_id=work_id, rejected="rejected", rejected_id=rejected_id
    )


def test_a_folder_holds_the_token_left_in_it(private: tuple[Path, int]) -> None:
    """holds() is true for the token leave() wrote, and false for any other."""
    _folder, fd = private
    token = folderproof.leave(fd)
    assert folderproof.holds(fd, token)
    assert not folderproof.holds(fd, "0" * 64)


def test_the_token_is_kept_across_restarts(private: tuple[Path, int]) -> None:
    """A folder that holds a token keeps it: leaving one again writes nothing new."""
    folder, fd = private
    token = folderproof.leave(fd)
    before = os.stat(folder / folderproof.PROOF_NAME).st_ino
    assert folderproof.leave(fd) == token
    assert os.stat(folder / folderproof.PROOF_NAME).st_ino == before


def test_a_token_reached_through_a_link_does_not_count(tmp_path: Path) -> None:
    """A proof file that is a symbolic link to a file with the right token is refused."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    fake = tmp_path / "fake"
    fake.mkdir(mode=0o700)
    real_fd, fake_fd = _open(real), _open(fake)
    try:
        token = folderproof.leave(real_fd)
        (fake / folderproof.PROOF_NAME).symlink_to(real / folderproof.PROOF_NAME)
        assert not folderproof.holds(fake_fd, token)
    finally:
        os.close(real_fd)
        os.close(fake_fd)


def test_a_folder_others_may_enter_proves_nothing(private: tuple[Path, int]) -> None:
    """A folder group or others may use is not accepted, whatever token it holds."""
    folder, fd = private
    token = folderproof.leave(fd)
    folder.chmod(0o750)
    assert not folderproof.holds(fd, token)


def test_renumbered_work_folder_with_its_token_is_the_daemons(inbox: Path) -> None:
    """After a remount that numbered the folders anew, the work folder holding the
    token is accepted, and so is the rejected folder."""
    work_id, rejected_id = prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    token, owner = _prove(inbox, work_id, rejected_id)
    with InboxFS(
        inbox,
        work_id=_renumbered(work_id),
        rejected_id=_renumbered(rejected_id),
        work_proof=token,
        rejected_owner=owner,
    ) as fs:
        assert os.fstat(fs.rejected).st_ino == rejected_id[1]
        assert os.fstat(fs.work).st_ino == work_id[1]
    proof = inbox / WORK_DIR_NAME / folderproof.PROOF_NAME
    assert (proof.stat().st_mode & 0o777, (inbox / WORK_DIR_NAME).stat().st_mode & 0o777) == (
        0o600,
        0o700,
    )  # no inbox writer may read the token, nor take the file out of the folder


def test_replaced_work_folder_is_refused_though_a_token_is_expected(inbox: Path) -> None:
    """A new folder put where the work folder was holds no token: it is refused."""
    work_id, rejected_id = prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    token, _owner = _prove(inbox, work_id, rejected_id)
    os.rename(inbox / WORK_DIR_NAME, inbox / "moved-away")
    (inbox / WORK_DIR_NAME).mkdir(mode=0o700)
    with InboxFS(inbox, work_id=work_id, work_proof=token) as fs, pytest.raises(Tampered):
        fs.work  # noqa: B018 - opening it is the check


def test_rejected_folder_renumbered_alone_is_accepted(inbox: Path) -> None:
    """SSHFS renumbers a folder the kernel forgot, without a remount: a rejected folder
    with other numbers but its owner at start is accepted beside the daemon's work
    folder."""
    work_id, rejected_id = prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    token, owner = _prove(inbox, work_id, rejected_id)
    with InboxFS(
        inbox,
        work_id=work_id,
        rejected_id=_renumbered(rejected_id),
        work_proof=token,
        rejected_owner=owner,
    ) as fs:
        assert os.fstat(fs.rejected).st_ino == rejected_id[1]


@pytest.mark.parametrize("remounted", [False, True])
def test_a_writers_own_rejected_folder_is_refused(inbox: Path, remounted: bool) -> None:
    """A folder of another user put in the rejected folder's place is tampering, before
    or after a remount, whatever the work folder proves."""
    work_id, rejected_id = prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    token, owner = _prove(inbox, work_id, rejected_id)
    os.rename(inbox / "rejected", inbox / "old-rejected")
    (inbox / "rejected").mkdir()
    os.chown(inbox / "rejected", 65534, 65534)  # the writer's own folder
    with (
        InboxFS(
            inbox,
            work_id=_renumbered(work_id) if remounted else work_id,
            rejected_id=rejected_id,
            work_proof=token,
            rejected_owner=owner,
        ) as fs,
        pytest.raises(Tampered),
    ):
        fs.rejected  # noqa: B018 - opening it is the check


def test_renumbered_work_folder_without_a_recorded_token_is_refused(inbox: Path) -> None:
    """An inbox whose token was never recorded (a manual deposit's) keeps the old rule:
    other numbers are another folder."""
    work_id, rejected_id = prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    _prove(inbox, work_id, rejected_id)
    with InboxFS(inbox, work_id=_renumbered(work_id)) as fs, pytest.raises(Tampered):
        fs.work  # noqa: B018 - opening it is the check


@pytest.mark.parametrize("suffix", ["", "-0123456789abcdef"], ids=["earlier-release", "own"])
def test_another_writers_half_written_token_is_left_alone(
    private: tuple[Path, int], suffix: str
) -> None:
    """A second daemon leaving its token while another daemon's is half-written (its
    temporary file there, under an earlier release's name or a name of its own)
    neither removes nor takes that file, and both end with the token the folder holds."""
    folder, fd = private
    theirs = folder / f"{folderproof.TEMP_NAME}{suffix}"
    theirs.write_bytes(b"f" * 64)
    theirs.chmod(0o600)
    token = folderproof.leave(fd)
    assert theirs.read_bytes() == b"f" * 64
    assert folderproof.holds(fd, token)
    os.rename(theirs, folder / folderproof.PROOF_NAME)  # the other daemon's rename, last
    assert folderproof.leave(fd) == "f" * 64
