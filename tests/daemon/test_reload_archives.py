"""Hostile review: an archive moved or renamed in the configuration (reload) while
inputs wait or are in flight. Real daemon subprocesses; no sleeps for
synchronisation (the test seams and polling with a deadline)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from nbankd.config import Config, load_config
from nbankd.config.model import ArchiveConfig
from nbankd.daemon import registry_setup, setup
from nbankd.daemon.registry_setup import open_configured_registry
from nbankd.registry.base import Registry


def _edit(h: DaemonHarness, change: Callable[[dict[str, Any]], Any]) -> None:
    cfg = yaml.safe_load(h.config_path.read_text())
    change(cfg)
    h.config_path.write_text(yaml.safe_dump(cfg))


def _reload(h: DaemonHarness, change: Callable[[dict[str, Any]], Any]) -> None:
    _edit(h, change)
    proc = nbankctl(h, "reload", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _receipt(h: DaemonHarness, ident: str) -> dict[str, Any] | None:
    return next((r for r in h.receipts() if r["id"] == ident), None)


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
    _reload(h, lambda cfg: cfg["archives"][0].update(path=str(moved)))
    h.drop("two.wav", b"after the change")

    def decided() -> Any:
        if _receipt(h, "two") is not None:
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
