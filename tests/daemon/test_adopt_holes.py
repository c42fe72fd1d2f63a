"""Holes left in the check of archives over a lost ``state_dir``
(:mod:`nbankd.daemon.late_archives`) and in the folder hash adoption and verification
share (:func:`nbankd.archive.verify.hash_folder`). Real daemon subprocesses, real
archives and embedded registries; polling with deadlines, never sleeps.

Findings, all fixed: a restart with a held late archive mounted at start, once another
archive had taken deposits, lifted the hold (the start-up check only looks while the
registry is empty), and the hold offered ``--adopt-archives`` "while the registry is
still empty", refused by then; an archive added by a reload was never checked; a
folder resource about a thousand levels deep hit RecursionError when hashed."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from fixtures.adoption import KEPT, add_mirror, held_said, hold_late_archive, plant
from fixtures.daemon import DaemonHarness, status_json, wait_for
from nbankd.archive import verify
from nbankd.archive.opening import create_archive
from nbankd.config import load_config
from nbankd.daemon import adopt_read, late_archives
from nbankd.daemon.registry_setup import open_configured_registry

Factory = Callable[..., DaemonHarness]


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def registered(h: DaemonHarness) -> dict[str, str | None]:
    db = sqlite3.connect(f"file:{h.state_dir / 'registry.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT name, sha1 FROM resource"))
    finally:
        db.close()


def first_scans(h: DaemonHarness) -> int:
    """How many times the daemon scanned its first inbox (``h.inbox``)."""
    return int(status_json(h)[1]["inboxes"][0]["scans"])


def scans_later(h: DaemonHarness, n: int) -> None:
    start = first_scans(h)
    wait_for(lambda: first_scans(h) >= start + n, 30, f"{n} more scans of the inbox")


def drop_into(folder: Path, name: str, data: bytes) -> None:
    """Writes a file into an inbox as a rig would: elsewhere, then renamed in."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".drop-{name}"
    tmp.write_bytes(data)
    os.rename(tmp, folder / name)


def held_with_mirror_deposit(daemon_factory: Factory) -> DaemonHarness:
    """A late archive held over a lost state_dir while a second archive, "mirror",
    has taken a deposit since (the registry is no longer empty)."""
    h = daemon_factory()
    add_mirror(h)
    hold_late_archive(h)
    drop_into(h.root / "inbox2", "mirror01.wav", b"deposited into the other archive")
    wait_for(lambda: h.receipt("mirror01"), 60, "mirror01 to be deposited")
    return h


# --- a restart ----------------------------------------------------------------------


def test_a_hold_survives_a_restart_once_another_archive_took_deposits(
    daemon_factory: Factory,
) -> None:
    """A held archive mounted at the next start, while the registry holds another
    archive's deposits, stays held: the input waiting is not deposited."""
    h = held_with_mirror_deposit(daemon_factory)
    h.stop()
    h.start()
    wait_for(lambda: held_said(h) or h.receipt("new01"), 60, "new01 to be held or deposited")
    scans_later(h, 2)
    assert h.receipt("new01") is None and (h.inbox / "new01.wav").exists()
    assert held_said(h) and "kept01" not in registered(h)
    h.stop()


def test_a_hold_survives_a_restart_until_its_first_stored_resource_is_recorded(
    daemon_factory: Factory,
) -> None:
    """Over a restart, a record of some other resource located in the held archive
    keeps the hold (as before the restart); a record of its first stored resource
    ends it, and the waiting input is deposited."""
    h = daemon_factory()
    hold_late_archive(h)
    h.stop()
    with h.open_registry() as reg:  # what a partly restored registry holds
        if reg.get_archive(h.archive_name) is None:
            reg.add_archive(h.archive_name, "neurobank", str(h.archive))
        reg.add_resource(name="other01", dtype=h.dtype, archive=h.archive_name, sha1=sha1(b"o"))
    h.start()
    wait_for(lambda: held_said(h) or h.receipt("new01"), 60, "new01 to be held or deposited")
    scans_later(h, 2)
    assert h.receipt("new01") is None and held_said(h)
    with h.open_registry() as reg:
        reg.add_resource(name="kept01", dtype=h.dtype, archive=h.archive_name, sha1=sha1(KEPT))
    wait_for(lambda: h.receipt("new01"), 60, "new01 to be deposited")
    wait_for(lambda: not held_said(h), 30, "status to stop telling the hold")
    h.stop()


def test_the_way_out_a_hold_names_works_once_another_archive_took_deposits(
    daemon_factory: Factory,
) -> None:
    """The hold names only ways out that work: after another archive took deposits,
    a start with --adopt-archives adopts what the held archive stores, keeps the
    other records, and the waiting input is deposited."""
    h = held_with_mirror_deposit(daemon_factory)
    # the archive's line, and a line for new01 when a claim met the hold first
    lines = [d for d in status_json(h)[1]["degraded"] if "state_dir lost" in d]
    assert lines and all("--adopt-archives" in d and "still empty" not in d for d in lines)
    before = registered(h)
    h.stop()
    h.start(args=["--adopt-archives"], timeout=120)
    wait_for(lambda: h.receipt("new01"), 60, "new01 to be deposited")
    now = registered(h)
    assert now["kept01"] == sha1(KEPT)
    assert {k: now[k] for k in before} == before
    assert not held_said(h)
    h.stop()


# --- a reload -------------------------------------------------------------------------


def test_an_archive_added_by_a_reload_holding_unrecorded_resources_is_held(
    daemon_factory: Factory,
) -> None:
    """An archive a reload adds, already holding resources the registry has no record
    of, takes no deposits: its inbox's input waits and status says why."""
    h = daemon_factory()
    h.start()
    h.drop("first01.wav", b"the registry is not empty")
    h.wait_settled(1)
    old = h.root / "old-archive"
    create_archive(old, h.registry_address)
    plant(old, "lost01.wav", b"stored under a registry that was lost")
    inbox3 = h.root / "inbox3"

    def add(cfg: dict[str, Any]) -> None:
        cfg["archives"].append({"path": str(old), "name": "old", "create": False})
        cfg["inboxes"].append(
            {"path": str(inbox3), "archive": "old", "dtype": h.dtype, "settle_seconds": 0.3}
        )

    h.reload_with(add)
    drop_into(inbox3, "x01.wav", b"must not go into the orphaned archive")
    wait_for(lambda: held_said(h, "old") or h.receipt("x01"), 60, "x01 to be held or deposited")
    scans_later(h, 2)
    assert h.receipt("x01") is None and (inbox3 / "x01.wav").exists()
    assert held_said(h, "old")
    h.stop()


# --- a deep folder resource -----------------------------------------------------------


def reference_hash(top: Path) -> str:
    """neurobank's directory hash of ``top``, computed here independently: the regular
    files under it (links, FIFOs left out), as "relpath=sha1" lines sorted by path parts."""
    lines: list[tuple[tuple[str, ...], str]] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            if entry.is_symlink():
                continue
            if entry.is_dir():
                stack.append(entry)
            elif entry.is_file():
                rel = PurePosixPath(entry.relative_to(top).as_posix())
                lines.append((rel.parts, f"{rel}={sha1(entry.read_bytes())}"))
    text = "\n".join(line for _parts, line in sorted(lines))
    return sha1(text.encode())


def _flat(top: Path) -> None:
    for i in range(5):
        (top / f"f{i}.bin").write_bytes(bytes([i]) * (i * 100))


def _nested(top: Path) -> None:
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "a" / "x").mkdir()
    (top / "a-b").mkdir()
    (top / "empty").mkdir()
    for rel in ("top.txt", "a/one", "a/b/two", "a/b/c/three", "a/x/four", "a-b/five", "a.b"):
        (top / rel).write_bytes(rel.encode() * 3)
    (top / "a" / "b" / "zero").write_bytes(b"")


def _odd(top: Path) -> None:
    (top / "sub").mkdir()
    (top / "sub" / "é ü.dat").write_bytes(b"accents")
    (top / "sub" / "data").write_bytes(b"data")
    (top / "link-to-folder").symlink_to(top / "sub")
    (top / "dangling").symlink_to(top / "nothing")
    os.mkfifo(top / "sub" / "fifo")


TREES = {"flat": _flat, "nested": _nested, "odd": _odd}


@pytest.mark.parametrize("shape", sorted(TREES))
def test_folder_hash_matches_an_independent_reference(tmp_path: Path, shape: str) -> None:
    """The folder hash of verification and adoption is neurobank's, for flat, nested
    and odd trees (a link to a folder, a dangling link and a FIFO left out)."""
    top = tmp_path / "res"
    top.mkdir()
    TREES[shape](top)
    want = reference_hash(top)
    assert verify.stored_sha1(top) == want
    assert adopt_read.stored_sha1(top) == want


def test_a_folder_a_thousand_levels_deep_is_hashed(tmp_path: Path) -> None:
    """A folder resource 1200 levels deep is hashed (no RecursionError), by
    verification and by adoption, to neurobank's hash."""
    top = tmp_path / "deep"
    folder = top
    for level in range(1200):
        folder.mkdir()
        (folder / f"f{level % 7}").write_bytes(str(level).encode())
        folder = folder / "d"
    lines = sorted(
        (("d",) * n + (f"f{n % 7}",), f"{'d/' * n}f{n % 7}={sha1(str(n).encode())}")
        for n in range(1200)
    )
    want = sha1("\n".join(line for _parts, line in lines).encode())
    try:
        assert reference_hash(top) == want
        assert verify.stored_sha1(top) == want
        assert adopt_read.stored_sha1(top) == want
    finally:  # bottom up: shutil.rmtree recurses too
        while folder != top:
            folder = folder.parent
            for f in folder.iterdir():
                if f.is_dir():
                    f.rmdir()
                else:
                    f.unlink()


# --- the record of holds --------------------------------------------------------------


def test_a_damaged_record_of_holds_holds_only_archives_whose_resources_are_unrecorded(
    tmp_path: Path,
) -> None:
    """A held-archives.json that cannot be understood holds every archive until it is
    checked: one whose first stored resource the registry records is released, one
    where it records only something else stays held."""
    path = tmp_path / "nbankd.yaml"
    path.write_text(
        "registry: embedded\nstate_dir: state\n"
        "archives: [{path: birds, name: birds, create: true}, {path: lost, name: lost}]\n"
        "inboxes: [{path: inbox, archive: birds, dtype: wav}]\n"
    )
    cfg = load_config(path)
    cfg.state_dir.mkdir()
    registry = open_configured_registry(cfg)
    try:
        for name in ("birds", "lost"):
            create_archive(tmp_path / name, registry.url)
            registry.add_archive(name, "neurobank", str(tmp_path / name))
            plant(tmp_path / name, f"{name}01.wav", name.encode())
        registry.add_datatype("wav")
        registry.add_resource(name="birds01", dtype="wav", archive="birds", sha1=sha1(b"birds"))
        # some record located in "lost", not of what it held first: still held
        registry.add_resource(name="other01", dtype="wav", archive="lost", sha1=sha1(b"o"))
        (cfg.state_dir / late_archives.HELD_NAME).write_text("{not json")
        late = late_archives.LateArchives(cfg)
        assert late.problem(registry, "birds", tmp_path / "birds") is None
        held = late.problem(registry, "lost", tmp_path / "lost")
        assert held is not None and "state_dir lost" in held
        saved = json.loads((cfg.state_dir / late_archives.HELD_NAME).read_text())
        assert saved["held"] == ["lost"]
    finally:
        registry.close()
