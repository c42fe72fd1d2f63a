"""Nothing outside the inbox (hostile round A): folders swapped for links at run time.

A writer of the inbox swaps a folder on the way to an input, the rejected folder,
a sub-folder of it, or the work folder for a symbolic link to an outside folder
holding files of the same names. The real daemon must never claim, archive,
register, write or remove anything through such a link: outside files stay byte
for byte, and a tampered work or rejected folder makes status degraded, naming
it, while the inputs wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, status_json, wait_for, work_entries
from reliability import figures

FILES = 60
_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): ``a`` and ``b`` trade places atomically."""
    rc = _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _outside(h: DaemonHarness, names: list[str], tag: bytes) -> tuple[Path, dict[str, str]]:
    folder = h.root / "outside"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(tag + name.encode() + os.urandom(64))
    return folder, _tree(folder)


def test_sub_folder_swapped_for_a_link_while_claiming_takes_nothing_outside(
    daemon_factory: Any,
) -> None:
    """While a thread keeps swapping ``inbox/sub`` with a link to an outside folder of
    same-named files, every real input is deposited once and no outside file is
    claimed, archived, registered or removed."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.2})
    names = [f"swap{i:03d}.dat" for i in range(FILES)]
    outside, before = _outside(h, names, b"OUTSIDE ")
    h.start()
    sub = h.inbox / "sub"
    sub.mkdir()
    inside = {}
    for name in names:
        inside[name] = b"INSIDE " + name.encode() + os.urandom(64)
        (sub / name).write_bytes(inside[name])
    stop = threading.Event()
    swaps = 0
    link = h.inbox / ".sub-link"  # hidden by the default ignore pattern .*

    def swapper() -> None:
        # RENAME_EXCHANGE swaps the folder and the link atomically: ``sub`` is the
        # link about half of the time, at any instant of a claim
        nonlocal swaps
        while not stop.is_set():
            try:
                if not os.path.lexists(link) and not os.path.lexists(sub):
                    break  # the daemon took the folder's last file and the folder stays
                if not os.path.lexists(link):
                    os.symlink(outside, link)  # the daemon rejected the link named sub
                if not os.path.lexists(sub):
                    os.rename(link, sub) if os.path.isdir(link) else None
                    continue
                _exchange(sub, link)
                swaps += 1
            except OSError:
                continue

    thread = threading.Thread(target=swapper)
    thread.start()
    try:  # claims while the swapping goes on (a third of the inputs, or a minute of it)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: len(h.receipts()) >= FILES // 3, 60, "deposits while swapping")
    finally:
        stop.set()
        thread.join()
    during = len(h.receipts())
    if os.path.islink(sub) and os.path.isdir(link) and not os.path.islink(link):
        _exchange(sub, link)
    elif not os.path.lexists(sub) and os.path.isdir(link) and not os.path.islink(link):
        os.rename(link, sub)
    if os.path.islink(link):
        os.unlink(link)
    wait_for(lambda: len(h.receipts()) >= FILES, 120, "every real input to be deposited")
    after = _tree(outside)
    stored = {p.name: p.read_bytes() for p in h.archive_files().values() if p.is_file()}
    figures.record(
        "inbox_escapes",
        "sub_folder_swapped_while_claiming",
        {
            "inputs": FILES,
            "swaps": swaps,
            "outside_files_changed": sum(before[k] != after.get(k) for k in before),
            "deposited": len(stored),
            "deposited_while_swapping": during,
        },
    )
    assert after == before, "an outside file was moved or changed"
    assert sorted(stored) == sorted(names)
    assert all(stored[n] == inside[n] for n in names), "an outside file's bytes were archived"
    h.stop()


def test_rejected_folder_replaced_by_a_link_is_not_followed(daemon_factory: Any) -> None:
    """With ``rejected/`` swapped for a link at run time, an input to reject waits in
    the work folder, status names the tampered folder, nothing lands outside; with
    the folder back, the input is rejected into it."""
    h: DaemonHarness = daemon_factory()
    outside, before = _outside(h, ["bad name.dat"], b"OUTSIDE ")
    h.start()
    os.rename(h.rejected, h.root / "rejected.real")
    os.symlink(outside, h.rejected)
    h.drop("bad name.dat", b"rejected bytes")

    def degraded() -> list[str]:
        return [d for d in status_json(h)[1]["degraded"] if "rejected folder" in d]

    # told by the inbox's own check, and by the rejected folders' count (a link there)
    lines = wait_for(degraded, 30, "status to name the tampered rejected folder")
    assert all(str(h.rejected) in line for line in lines), lines
    assert _tree(outside) == before
    os.unlink(h.rejected)
    os.rename(h.root / "rejected.real", h.rejected)
    h.wait_settled(1)
    assert (h.rejected / "bad name.dat").read_bytes() == b"rejected bytes"
    assert _tree(outside) == before
    h.stop()


def test_rejected_sub_folder_that_is_a_link_is_not_followed(daemon_factory: Any) -> None:
    """``rejected/sub`` made a link: ``sub/bad name.dat`` is not written through it but
    rejected to the rejected folder's top, with its reason; the outside is untouched."""
    h: DaemonHarness = daemon_factory()
    outside, before = _outside(h, ["bad name.dat"], b"OUTSIDE ")
    h.start()
    os.symlink(outside, h.rejected / "sub")
    h.drop("sub/bad name.dat", b"rejected bytes")
    h.wait_settled(1)
    assert (h.rejected / "bad name.dat").read_bytes() == b"rejected bytes"
    [reason] = h.reasons()
    assert reason["rejected_path"] == str(h.rejected / "bad name.dat")
    assert _tree(outside) == before
    h.stop()


def test_work_folder_replaced_by_a_link_claims_nothing(daemon_factory: Any) -> None:
    """With ``.nbank`` swapped for a link at run time nothing is claimed into it: the
    input stays in the inbox, status names the work folder, the outside is untouched."""
    h: DaemonHarness = daemon_factory()
    outside, before = _outside(h, ["x"], b"OUTSIDE ")
    h.start()
    work = h.inbox / ".nbank"
    os.rename(work, h.root / "work.real")
    os.symlink(outside, work)
    src = h.drop("kept01.dat", b"stays in the inbox")

    def degraded() -> list[str]:
        return [d for d in status_json(h)[1]["degraded"] if "work folder" in d]

    wait_for(degraded, 30, "status to name the tampered work folder")
    assert src.read_bytes() == b"stays in the inbox"
    assert _tree(outside) == before
    os.unlink(work)
    os.rename(h.root / "work.real", work)
    h.wait_settled(1)
    assert [r["id"] for r in h.receipts()] == ["kept01"]
    h.stop()


def test_sidecar_folder_swapped_after_the_claim_loses_nothing(daemon_factory: Any) -> None:
    """The input moved into the work folder, then its folder swapped for a link before
    its sidecar follows: the input is still deposited (without the sidecar, as if it
    had been deleted), never left stranded in the work folder; outside is untouched."""
    h: DaemonHarness = daemon_factory()
    outside, before = _outside(h, ["x"], b"OUTSIDE ")
    (outside / "stranded.dat.nbank.yaml").write_text("id: fromoutside\n")
    before = _tree(outside)
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim-rename", "NBANKD_PAUSE_UNTIL": str(release)})
    sess = h.inbox / "sess"
    sess.mkdir()
    (sess / "stranded.dat.nbank.yaml").write_text("id: fromsidecar\n")
    h.drop("sess/stranded.dat", b"claimed, then its folder swapped")
    wait_for(lambda: not (sess / "stranded.dat").exists(), 30, "the input to be claimed")
    os.rename(sess, h.root / "sess.real")
    os.symlink(outside, sess)
    release.touch()
    h.wait_settled(1)
    [receipt] = h.receipts()
    assert receipt["id"] == "stranded"
    assert h.archive_files()["stranded.dat"].read_bytes() == b"claimed, then its folder swapped"
    assert work_entries(h.inbox / ".nbank") == []
    assert _tree(outside) == before
    h.stop()


def test_a_deeply_nested_input_costs_no_descriptors_per_level(daemon_factory: Any) -> None:
    """An input 600 folders deep, with a sidecar, is claimed and deposited: walking
    from the inbox keeps one descriptor at a time, not one per level (the daemon's
    limit is 1024)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    rel = "/".join(["d"] * 600)
    folder = h.inbox / rel
    folder.mkdir(parents=True)
    (folder / "deep01.dat.nbank.yaml").write_text("metadata: {depth: 600}\n")
    h.drop(f"{rel}/deep01.dat", b"six hundred folders down")
    h.wait_settled(1)
    [receipt] = h.receipts()
    assert receipt["id"] == "deep01"
    with h.open_registry() as reg:
        assert reg.get_resource("deep01").metadata["depth"] == 600
    h.stop()
