"""What an archive's filesystem can do (nbankd.archive.probe), and what nbankd says it
does instead of what is missing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from nbankd.archive.probe import Capabilities, filesystem_type, probe

ALL = Capabilities(hard_links=True, rename_noreplace=True, o_direct=True, flock=True)


def test_a_local_filesystem_has_everything(tmp_path: Path) -> None:
    """On the test machine's disk every feature works, and the probe leaves nothing."""
    caps = probe(tmp_path)
    assert replace(caps, fs_type="") == ALL and caps.fs_type and caps.shared_locks
    assert caps.notes() == [] and list(tmp_path.iterdir()) == []


def test_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    """A folder that is not there (an unmounted archive) raises; nothing is guessed."""
    with pytest.raises(OSError):
        probe(tmp_path / "not-mounted")


@pytest.mark.parametrize(
    ("caps", "phrases", "publish"),
    [
        (ALL, [], True),
        (Capabilities(False, True, True, True), ["renameat2(RENAME_NOREPLACE)"], True),
        (Capabilities(False, False, True, True), ["deposits into it wait"], False),
        (Capabilities(True, True, False, True), ["no O_DIRECT"], True),
        (Capabilities(True, True, True, False), ["no flock"], True),
        (Capabilities(True, True, True, True, "fuse.sshfs"), ["this host only"], True),
    ],
)
def test_notes_say_what_is_done_instead(
    caps: Capabilities, phrases: list[str], publish: bool
) -> None:
    """Each missing feature gets one sentence naming the fallback (or the wait)."""
    notes = caps.notes()
    assert len(notes) == len(phrases)
    assert all(p in n for p, n in zip(phrases, notes, strict=True))
    assert caps.can_publish is publish


MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
45 22 0:40 / /srv/archive rw,nosuid shared:20 - fuse.sshfs lab@nas:/data rw,user_id=0
46 22 0:41 / /srv/archive/old rw shared:21 - nfs4 nas:/old rw
47 22 0:42 / /mnt/with\\040space rw shared:22 - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("folder", "kind"),
    [
        ("/srv/archive/staging", "fuse.sshfs"),
        ("/srv/archive", "fuse.sshfs"),
        ("/srv/archive/old/staging", "nfs4"),
        ("/srv/archived", "ext4"),
        ("/mnt/with space/x", "tmpfs"),
    ],
)
def test_filesystem_type_is_the_deepest_mount_above(folder: str, kind: str) -> None:
    """The type of the innermost mount holding the folder (a name that only starts like
    a mount point is not inside it)."""
    assert filesystem_type(Path(folder), MOUNTINFO) == kind
