"""Hostile review: a requeue stopped half way in an inbox the next start leaves out
is still undone when the inbox returns, whatever requeues happen meanwhile (one record
per inbox); a reload whose new registry cannot be opened fails, keeping the whole
running configuration, and the next reload tries again. Real daemon subprocesses; no
sleeps for synchronisation (the test seams and polling with a deadline)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from nbankd.daemon import requeue_recovery


def test_an_interrupted_requeue_is_undone_when_its_inbox_returns_after_other_requeues(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A requeue stopped half way in an inbox that the next start does not configure
    is still undone when the inbox returns, even after requeues in other inboxes: its
    sidecar goes back beside its rejected input, never left for the next recording."""
    h = daemon_factory()
    other = h.root / "inbox-y"

    def two_inboxes(cfg: dict[str, Any]) -> None:
        cfg["inboxes"].append({**cfg["inboxes"][0], "path": str(other)})

    h.write_config()
    h.edit_config(two_inboxes)
    both = h.config_path.read_text()
    h.start(env={"NBANKD_CRASH_AT": "requeue-side-moved"})
    h.drop("rec.wav.nbank.yaml", b"id: 'not an id!'\nmetadata: {animal: bird9}\n")
    h.drop("rec.wav", b"first take")
    h.wait_settled(1)
    nbankctl(h, "requeue", str(h.rejected / "rec.wav"))  # killed after the sidecar moved
    h.wait_exit()
    assert (h.inbox / "rec.wav.nbank.yaml").exists()  # the state the record undoes
    h.edit_config(lambda cfg: cfg["inboxes"].pop(0))  # restarted without that inbox
    h.start()
    (other / "oops.wav.nbank.yaml").write_text("id: [\n")
    (other / "oops.wav").write_bytes(b"rejected in the other inbox")
    wait_for(lambda: (other / "rejected" / "oops.wav.reason").exists(), 30, "a rejection")
    # done (today: its record replaces the stopped one) or refused: either is fine
    nbankctl(h, "requeue", str(other / "rejected" / "oops.wav"))
    h.stop()
    h.config_path.write_text(both)  # the inbox is back
    h.start()
    sidecar_left = (h.inbox / "rec.wav.nbank.yaml").exists()
    h.drop("rec.wav", b"second take, a new recording")
    wait_for(
        lambda: h.receipt("rec") or (h.rejected / "rec~1.wav.reason").exists(),
        30,
        "the new recording to be deposited or rejected",
    )
    h.stop()
    assert not sidecar_left, "the old sidecar was left in the inbox"
    assert (h.rejected / "rec.wav.nbank.yaml").exists()
    receipt = h.receipt("rec")
    assert receipt is not None, "the new recording was rejected with the old sidecar"
    assert Path(receipt["archive_path"]).read_bytes() == b"second take, a new recording"


def _two_inboxes_requeue_stopped(h: DaemonHarness, other: Path) -> str:
    """Configures the harness's inbox and ``other``, and stops a requeue of rec.wav in
    the first after its sidecar moved back (the daemon killed there); returns the
    configuration naming both inboxes."""

    def two_inboxes(cfg: dict[str, Any]) -> None:
        cfg["inboxes"].append({**cfg["inboxes"][0], "path": str(other)})

    h.write_config()
    h.edit_config(two_inboxes)
    both = h.config_path.read_text()
    h.start(env={"NBANKD_CRASH_AT": "requeue-side-moved"})
    h.drop("rec.wav.nbank.yaml", b"id: 'not an id!'\nmetadata: {animal: bird9}\n")
    h.drop("rec.wav", b"first take")
    h.wait_settled(1)
    nbankctl(h, "requeue", str(h.rejected / "rec.wav"))  # killed after the sidecar moved
    h.wait_exit()
    assert (h.inbox / "rec.wav.nbank.yaml").exists()  # the state the record undoes
    return both


def test_an_interrupted_requeue_is_undone_when_a_reload_brings_its_inbox_back(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """The inbox left out at the next start comes back by a reload: before it is
    scanned, its stopped requeue is undone (the sidecar back beside its rejected
    input), and a new recording of that name is deposited on its own."""
    h = daemon_factory()
    both = _two_inboxes_requeue_stopped(h, h.root / "inbox-y")
    h.edit_config(lambda cfg: cfg["inboxes"].pop(0))  # restarted without that inbox
    h.start()
    h.config_path.write_text(both)  # the inbox is back
    proc = nbankctl(h, "reload", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sidecar_left = (h.inbox / "rec.wav.nbank.yaml").exists()
    h.drop("rec.wav", b"second take, a new recording")
    wait_for(
        lambda: h.receipt("rec") or (h.rejected / "rec~1.wav.reason").exists(),
        30,
        "the new recording to be deposited or rejected",
    )
    h.stop()
    assert not sidecar_left, "the old sidecar was left in the inbox"
    assert (h.rejected / "rec.wav.nbank.yaml").exists()
    receipt = h.receipt("rec")
    assert receipt is not None, "the new recording was rejected with the old sidecar"
    assert Path(receipt["archive_path"]).read_bytes() == b"second take, a new recording"


def test_a_requeue_into_an_inbox_with_a_kept_record_recovers_it_first(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A record still there for an inbox (its recovery failed at start; here: put back
    by hand while the daemon runs) is recovered by the next requeue into that inbox
    before it writes its own: the sidecar the stopped requeue had moved goes back
    with its input, and the record is gone."""
    h = daemon_factory()
    _two_inboxes_requeue_stopped(h, h.root / "inbox-y")
    record = requeue_recovery.record_path(h.state_dir, str(h.inbox))
    saved = record.read_bytes()
    h.start()  # recovered at start: the sidecar is back in the rejected folder
    assert not record.exists()
    (h.rejected / "rec.wav.nbank.yaml").rename(h.inbox / "rec.wav.nbank.yaml")
    record.write_bytes(saved)  # as if the start could not recover it
    proc = nbankctl(h, "requeue", str(h.rejected / "rec.wav"), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    moved = json.loads(proc.stdout)["requeued"][0]["moved"]
    assert [Path(dst).name for _, dst in moved] == ["rec.wav.nbank.yaml", "rec.wav"]
    assert not record.exists()
    wait_for((h.rejected / "rec.wav.reason").exists, 30, "the input to be rejected again")
    h.stop()
    assert (h.rejected / "rec.wav.nbank.yaml").exists()
    assert not (h.inbox / "rec.wav.nbank.yaml").exists()


def test_a_reload_whose_new_registry_cannot_be_opened_says_so_and_is_tried_again(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A reload whose new registry cannot be opened (credentials file without an entry
    for its host) is not answered "done" (exit 2, naming why); once the file is fixed,
    the next reload opens the registry the configuration names."""
    h = daemon_factory()
    h.start()
    auth = h.root / "registry-auth"
    auth.write_text("machine elsewhere.example login lab password secret\n")
    auth.chmod(0o600)
    url = "http://127.0.0.1:9/neurobank/"
    h.edit_config(lambda cfg: cfg.update(registry=url, registry_auth=str(auth)))
    first = nbankctl(h, "reload", "--json")
    kept = status_json(h)[1]["registry"]["url"]
    auth.write_text("machine 127.0.0.1 login lab password secret\n")
    second = nbankctl(h, "reload", "--json")
    used = status_json(h)[1]["registry"]["url"]
    h.stop()
    # before the fix: answered done, the old registry kept
    assert first.returncode == 2, first.stdout
    assert "127.0.0.1" in first.stdout + first.stderr
    assert kept != url  # the running configuration stayed whole
    assert second.returncode == 0, second.stdout + second.stderr
    assert used == url  # before the fix: never tried again, the old registry until a restart
