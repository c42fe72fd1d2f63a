"""An input's intent against reloads: journaled under one configuration, deposited
under that one or decided again under the next, never a mix (hostile review of
reloads, 2026-12-07). Real daemon subprocesses; no sleeps for synchronisation (the
test seams and polling with a deadline)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for, work_entries


def _archive_b(h: DaemonHarness, cfg: dict[str, Any]) -> str:
    name = "b" + h.archive_name
    cfg["archives"].append({"path": str(h.root / "archive-b"), "name": name, "create": True})
    cfg["datatypes"] = {"test-file-b": "application/octet-stream"}
    return name


# -- findings ------------------------------------------------------------------


def test_an_input_journaled_before_a_reload_keeps_one_configurations_archive_and_datatype(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An input whose intent was journaled before a reload that re-points its inbox at
    another archive and datatype is deposited with the archive and datatype of one
    configuration, never the old archive with the new datatype."""
    h = daemon_factory()
    h.write_config()
    names: list[str] = []
    h.edit_config(lambda cfg: names.append(_archive_b(h, cfg)))
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(release)})
    h.drop("mixed.wav", b"written under the first configuration")
    wait_for(Path(f"{release}.reached").exists, 30, "the intent to be journaled")

    def repointed(cfg: dict[str, Any]) -> None:
        cfg["inboxes"][0].update(archive=names[0], dtype="test-file-b")

    h.reload_with(repointed)
    release.touch()
    wait_for(lambda: h.receipt("mixed"), 30, "the input to be deposited")
    h.stop()
    receipt = h.receipt("mixed")
    assert receipt is not None
    with h.open_registry() as reg:
        record = reg.get_resource("mixed")
    assert record is not None
    pair = (receipt["archive"], record.dtype)
    # it went to the first archive, registered with the second configuration's datatype
    assert pair in {(h.archive_name, "test-file"), (names[0], "test-file-b")}, pair


# -- guard ----------------------------------------------------------------------


def test_guard_two_reloads_back_to_back_during_a_burst_deposit_each_input_once(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """Guard: SIGHUPs and nbankctl reloads back to back (inbox re-pointed at another
    archive and back) during a burst: every input is deposited exactly once, its bytes
    in the archive its receipt names, registered there, nothing parked or left over."""
    h = daemon_factory(inbox_options={"settle_seconds": 0.05})
    h.write_config()
    names: list[str] = []
    h.edit_config(lambda cfg: names.append(_archive_b(h, cfg)))
    first = h.config_path.read_text()
    h.edit_config(lambda cfg: cfg["inboxes"][0].update(archive=names[0]))
    second = h.config_path.read_text()
    h.config_path.write_text(first)
    h.start()
    assert h.proc is not None
    n = 240
    for i in range(n):
        if i in (60, 62):
            h.config_path.write_text(second if i == 60 else first)
            h.proc.send_signal(signal.SIGHUP)
        if i == 150:
            for text in (second, first):
                h.config_path.write_text(text)
                assert nbankctl(h, "reload").returncode == 0
        h.drop(f"b{i:04d}.dat", f"input {i}".encode())
    h.wait_settled(n, timeout=120)
    code, status = status_json(h)
    h.stop()
    receipts = h.receipts()
    assert len(receipts) == n and len({r["id"] for r in receipts}) == n
    assert h.reasons() == []
    with h.open_registry() as reg:
        for r in receipts:
            stored = Path(r["archive_path"])
            assert stored.read_bytes() == f"input {int(r['id'][1:])}".encode()
            record = reg.get_resource(r["id"])
            assert record is not None and record.locations == (r["archive"],)
            root = reg.find_archive_by_root(str(stored.parents[2]))
            assert root is not None and root.name == r["archive"]
    assert not any(work_entries(h.inbox / ".nbank"))
    assert code == 0, status["degraded"]
