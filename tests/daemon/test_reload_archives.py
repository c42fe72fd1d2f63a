"""Hostile review: an archive moved or renamed in the configuration (reload) while
inputs wait or are in flight. Real daemon subprocesses; no sleeps for
synchronisation (the test seams and polling with a deadline)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for, work_entries
from nbankd.archive.opening import create_archive
from nbankd.config import Config, load_config
from nbankd.config.model import ArchiveConfig
from nbankd.daemon import registry_setup, setup
from nbankd.daemon.registry_setup import open_configured_registry
from nbankd.registry.base import Registry


def _archive_b(h: DaemonHarness, cfg: dict[str, Any]) -> str:
    name = "b" + h.archive_name
    cfg["archives"].append({"path": str(h.root / "archive-b"), "name": name, "create": True})
    return name


def _error_codes(h: DaemonHarness) -> list[str]:
    """The error codes of the journal's items (read-only)."""
    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in db.execute("SELECT error_code FROM items") if r[0]]
    finally:
        db.close()


def test_an_archive_moved_in_the_configuration_gets_no_deposits_the_registry_places_elsewhere(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An archive whose path changes in the configuration (same name) to a folder the
    registry does not know gets no deposits: every deposited file lies under the root
    the registry records for the archive its location names."""
    h = daemon_factory()
    h.start()
    h.drop("one.wav", b"before the change")
    h.wait_settled(1)
    moved = h.root / "archive-moved"
    h.reload_with(lambda cfg: cfg["archives"][0].update(path=str(moved)))
    h.drop("two.wav", b"after the change")

    def decided() -> Any:
        if h.receipt("two") is not None:
            return True
        return [d for d in status_json(h)[1]["degraded"] if str(h.inbox) in d]

    wait_for(decided, 30, "the input to be deposited, or held with its inbox named")
    h.stop()
    with h.open_registry() as reg:
        for receipt in h.receipts():
            record = reg.find_archive_by_root(str(Path(receipt["archive_path"]).parents[2]))
            # "two" went to archive-moved/, registered at the archive whose root is the
            # old path: nbank locate/fetch look where it is not
            assert record is not None and record.name == receipt["archive"], receipt


def test_an_input_held_by_a_misnamed_archive_is_deposited_once_the_name_is_put_right(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An input journaled while an archive's name was wrong in the configuration (status
    says "set name: X"), with nothing written anywhere yet, is deposited once the name
    is put back and reloaded: never parked for ever, asking for the wrong name back."""
    h = daemon_factory()
    h.start()

    def misnamed(cfg: dict[str, Any]) -> None:
        cfg["archives"][0]["name"] = "typo"
        cfg["inboxes"][0]["archive"] = "typo"

    h.reload_with(misnamed)
    h.drop("held.wav", b"dropped while the name was wrong")
    wait_for(lambda: _error_codes(h), 30, "the input to wait")

    def fixed(cfg: dict[str, Any]) -> None:
        cfg["archives"][0]["name"] = h.archive_name
        cfg["inboxes"][0]["archive"] = h.archive_name

    h.reload_with(fixed)

    def decided() -> Any:
        return h.receipt("held") or "parked" in _error_codes(h)

    wait_for(decided, 60, "the input to be deposited or parked")
    h.stop()
    receipt = h.receipt("held")
    assert receipt is not None, "parked until archive 'typo' is configured again"
    assert receipt["archive"] == h.archive_name
    assert not any(work_entries(h.inbox / ".nbank"))


# -- around the findings ----------------------------------------------------------------


def _states(h: DaemonHarness) -> list[str]:
    """The states of the journal's items, oldest first (read-only)."""
    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in db.execute("SELECT state FROM items ORDER BY id")]
    finally:
        db.close()


def test_an_input_staged_for_an_archive_a_reload_removes_is_decided_again_and_deposited_once(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """Staged for archive A (nothing registered), then a reload removes A and points the
    inbox at B: the input goes back to its inbox and is deposited in B, once; A gets no
    record and no file (its staged copy is left in staging/, safe to delete, and logged)."""
    h = daemon_factory()
    h.write_config()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-stage", "NBANKD_PAUSE_UNTIL": str(release)})
    h.drop("again.wav", b"staged for A, deposited in B")
    wait_for(lambda: any((h.archive / "staging").iterdir()), 30, "the input to be staged in A")
    other = h.root / "archive-b"

    def only_b(cfg: dict[str, Any]) -> None:
        name = _archive_b(h, cfg)
        cfg["inboxes"][0]["archive"] = name
        del cfg["archives"][0]

    h.reload_with(only_b)
    release.touch()
    wait_for(lambda: h.receipt("again"), 60, "the input to be deposited")
    h.stop()
    [receipt] = h.receipts()
    assert receipt["archive"] == "b" + h.archive_name
    assert Path(receipt["archive_path"]).read_bytes() == b"staged for A, deposited in B"
    assert Path(receipt["archive_path"]).is_relative_to(other)
    assert list((h.archive / "resources").rglob("*")) == []
    with h.open_registry() as reg:
        record = reg.get_resource("again")
    assert record is not None and record.locations == ("b" + h.archive_name,)
    assert _states(h) == ["returned", "done"]
    assert '"code": "archive-changed"' in h.log_path.read_text()  # decided again
    assert not any(work_entries(h.inbox / ".nbank"))
    assert not (h.inbox / "again.wav").exists()
    assert "may have left a staged copy" in h.log_path.read_text()


def test_an_input_waiting_for_a_misplaced_archive_is_deposited_where_the_registry_has_it(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """The archive's path moved in the configuration to another archive folder the
    registry does not know: the input is journaled but waits, untouched in its inbox
    (code archive-unregistered); once the path is put back, it is decided again and
    deposited under the root the registry has, once, and the other folder gets nothing."""
    h = daemon_factory()
    h.start()
    copy = h.root / "archive-copy"
    create_archive(copy, json.loads((h.archive / "nbank.json").read_text())["registry"])
    good = h.config_path.read_text()
    h.reload_with(lambda cfg: cfg["archives"][0].update(path=str(copy)))
    h.drop("waits.wav", b"waits for the right archive")
    wait_for(lambda: "archive-unregistered" in _error_codes(h), 30, "the input to wait")
    assert (h.inbox / "waits.wav").read_bytes() == b"waits for the right archive"
    assert not any(work_entries(h.inbox / ".nbank"))
    [line] = [d for d in status_json(h)[1]["degraded"] if str(h.inbox) in d]
    assert str(copy) in line and str(h.archive) in line
    h.config_path.write_text(good)
    proc = nbankctl(h, "reload", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: h.receipt("waits"), 60, "the input to be deposited")
    h.stop()
    [receipt] = h.receipts()
    assert Path(receipt["archive_path"]).is_relative_to(h.archive)
    assert list((copy / "resources").rglob("*")) == []
    assert list((copy / "staging").rglob("*")) == []
    assert _states(h) == ["returned", "done"]
    assert '"code": "archive-changed"' in h.log_path.read_text()  # decided again


# -- the registry's record of an archive (start-up and reload checks) -------------------


def _embedded(tmp_path: Path, archives: str) -> tuple[Config, Registry]:
    path = tmp_path / "nbankd.yaml"
    path.write_text(
        f"registry: embedded\nstate_dir: state\narchives: {archives}\n"
        "inboxes: [{path: inbox, archive: birds, dtype: wav}]\n"
    )
    cfg = load_config(path)
    cfg.state_dir.mkdir()
    return cfg, open_configured_registry(cfg)


def test_the_registrys_record_of_an_archive_is_checked_name_and_root(tmp_path: Path) -> None:
    cfg, reg = _embedded(tmp_path, "[{path: birds, name: birds, create: true}]")
    with reg:
        assert registry_setup.check(cfg, reg).archive_problems == ()
        birds = tmp_path / "birds"
        assert setup.registration_problem(reg, "birds", birds) is None
        link = tmp_path / "link"
        link.symlink_to(birds)  # a root registered with links resolved names it too
        assert setup.registration_problem(reg, "birds", link) is None
        moved = setup.registration_problem(reg, "birds", tmp_path / "moved")
        assert moved is not None and f"has archive 'birds' at neurobank:{birds}" in moved
        assert f"set path: {birds} back" in moved
        typo = setup.registration_problem(reg, "typo", birds)
        assert typo is not None and "has no archive 'typo'" in typo
        assert "set name: birds" in typo
        new = setup.registration_problem(reg, "new", tmp_path / "new")
        assert new is not None and "nbankctl init" in new


def test_no_archive_is_made_where_the_registry_does_not_place_its_name(tmp_path: Path) -> None:
    """An archive moved in the configuration (same name, create: true): nothing is made
    at the new path, and its problem is retried, named as unregistered."""
    cfg, reg = _embedded(tmp_path, "[{path: birds, name: birds, create: true}]")
    with reg:
        registry_setup.check(cfg, reg)
        archive = ArchiveConfig(tmp_path / "moved", "birds", create=True)
        moved = replace(cfg, archives=(archive,))
        result = registry_setup.check(moved, reg)
    [problem] = result.archive_problems
    assert problem.unregistered and problem.transient and "set path:" in problem.message
    assert not (tmp_path / "moved").exists()
    assert result.registrations == {(reg.url, "birds", str(tmp_path / "moved")): problem.message}
    assert result.retry
