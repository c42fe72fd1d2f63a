"""A bad copy never becomes visible in ``resources/`` (hostile round B): with
``verify: true`` the staged copy is read back from storage before it is published.

The daemon is held right after staging; the test flips a byte of the staged copy
(what a failing disk or a stray writer would do), then lets it go on.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from fixtures.daemon import DaemonHarness, wait_for


def test_corrupted_staged_copy_is_never_published(daemon_factory: Any) -> None:
    """The flipped staged copy is caught by the publish step (verify-failed), made
    again from the claimed input, and the archive ends with the right bytes."""
    h: DaemonHarness = daemon_factory()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-stage", "NBANKD_PAUSE_UNTIL": str(release)})
    data = os.urandom(100_000)
    h.drop("flip01.dat", data)
    staging = h.archive / "staging"
    [staged] = wait_for(lambda: list(staging.iterdir()), 30, "the staged copy")
    st = staged.stat()
    with open(staged, "r+b") as f:  # a byte goes bad on the way to storage
        f.seek(50_000)
        byte = f.read(1)
        f.seek(50_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))  # as bit rot would: same mtime
    release.touch()
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["flip01.dat"].read_bytes() == data
    caught = []
    for line in h.log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("code") == "verify-failed":
            caught.append(event.get("step"))
    assert caught and set(caught) == {"publish"}, caught  # before it was ever linked


def test_staged_copy_replaced_under_its_name_is_never_published(daemon_factory: Any) -> None:
    """A staged copy swapped for another file under the same name (same bytes, another
    inode: what a second process writing there would leave) is refused by publish
    (staged-changed) and made again; staged names carry this process's instance."""
    h: DaemonHarness = daemon_factory()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-stage", "NBANKD_PAUSE_UNTIL": str(release)})
    data = os.urandom(50_000)
    h.drop("swap01.dat", data)
    staging = h.archive / "staging"
    [staged] = wait_for(lambda: list(staging.iterdir()), 30, "the staged copy")
    assert re.fullmatch(r"\.nbankd-[0-9a-f]{32}-[0-9a-f]{8}", staged.name), staged.name
    other = staging / "other"
    other.write_bytes(staged.read_bytes())
    os.replace(other, staged)  # same name and bytes, another file
    release.touch()
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["swap01.dat"].read_bytes() == data
    steps = [e.get("step") for e in h.log_events() if e.get("code") == "staged-changed"]
    assert steps == ["publish"], steps
    assert list(staging.iterdir()) == []
