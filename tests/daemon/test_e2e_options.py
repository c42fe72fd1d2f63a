"""End to end: inbox options, reloads, permissions and inputs that change under the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fixtures.daemon import NBANKD, DaemonHarness, status_json, wait_for, work_entries
from nbankd.archive.opening import create_archive
from nbankd.hashing import directory_hash


def _log_events(h: DaemonHarness) -> list[dict[str, Any]]:
    events = []
    for line in h.log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def test_poll_mode_inbox_deposits_without_inotify(daemon_factory: Any) -> None:
    """With watch: poll, the rescan alone finds and deposits files."""
    h = daemon_factory(inbox_options={"watch": "poll", "rescan_every": "1s"})
    h.start()
    h.drop("polled.wav", b"found by polling")
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["polled.wav"].read_bytes() == b"found by polling"


def test_sighup_reload_picks_up_a_new_inbox(daemon_factory: Any) -> None:
    """After SIGHUP, an inbox added to the configuration is watched and deposits."""
    h = daemon_factory()
    h.write_config()
    h.start()
    cfg = yaml.safe_load(h.config_path.read_text())
    second = h.root / "inbox2"
    cfg["inboxes"].append({**cfg["inboxes"][0], "path": str(second)})
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(second.is_dir, 20, "the reloaded daemon to create the new inbox")
    (second / "late.wav").write_bytes(b"second inbox")
    wait_for(lambda: any(r["id"] == "late" for r in h.receipts()), 30, "deposit from inbox2")
    h.stop()
    assert h.archive_files()["late.wav"].read_bytes() == b"second inbox"


def test_bad_configuration_on_reload_keeps_the_daemon_running(daemon_factory: Any) -> None:
    """A broken file on SIGHUP is logged and the running configuration stays in force."""
    h = daemon_factory()
    h.start()
    h.config_path.write_text(h.config_path.read_text() + "\nbogus_key: 1\n")
    h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(
        lambda: any(e.get("event", "").startswith("reload failed") for e in _log_events(h)),
        20,
        "the reload failure to be logged",
    )
    h.drop("still.wav", b"still running")
    h.wait_settled(1)
    assert h.stop() == 0


def test_growing_file_is_reported_stalled_and_not_deposited(daemon_factory: Any) -> None:
    """A file that keeps changing past stall_after is logged as stalled and left alone."""
    h = daemon_factory(inbox_options={"settle_seconds": 1, "stall_after": "2s"})
    h.start()
    path = h.inbox / "growing.wav"
    stop = threading.Event()

    def grow() -> None:
        with open(path, "ab") as f:
            while not stop.wait(0.1):
                f.write(b"x" * 100)
                f.flush()

    writer = threading.Thread(target=grow)
    writer.start()
    try:
        wait_for(
            lambda: any(e.get("event") == "file still changing" for e in _log_events(h)),
            30,
            "the stalled-file warning",
        )
        assert h.receipts() == []
    finally:
        stop.set()
        writer.join()
    final = path.read_bytes()
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["growing.wav"].read_bytes() == final


def test_folder_resources_are_deposited_with_neurobank_directory_hash(
    daemon_factory: Any,
) -> None:
    """With directories: resources and an archive that allows them, a folder is one resource."""
    h = daemon_factory(inbox_options={"directories": "resources"})
    create_archive(h.archive, h.registry_address, allow_directories=True)
    h.start()
    staging = h.root / "session7"
    (staging / "probe").mkdir(parents=True)
    (staging / "probe" / "spikes.dat").write_bytes(os.urandom(3000))
    (staging / "notes.txt").write_bytes(b"session notes")
    expected = directory_hash(staging)
    os.rename(staging, h.inbox / "session7")
    h.wait_settled(1)
    h.stop()
    [receipt] = h.receipts()
    assert receipt["id"] == "session7"
    assert receipt["sha1"] == expected
    stored = h.archive / "resources" / "se" / "session7"
    assert directory_hash(stored) == expected
    assert (stored / "notes.txt").read_bytes() == b"session notes"


def test_rename_placement_publishes_the_claimed_file_itself(daemon_factory: Any) -> None:
    """placement: rename moves the claimed inode into the archive (same filesystem)."""
    h = daemon_factory(inbox_options={"placement": "rename"})
    h.start()
    data = os.urandom(50_000)
    src = h.drop("moved.wav", data)
    inode = src.stat().st_ino
    h.wait_settled(1)
    h.stop()
    stored = h.archive_files()["moved.wav"]
    assert stored.read_bytes() == data
    assert stored.stat().st_ino == inode
    assert h.receipts()[0]["sha1"] == hashlib.sha1(data).hexdigest()


def test_file_changed_during_copy_is_put_back_and_deposited_when_finished(
    daemon_factory: Any,
) -> None:
    """A claimed file that changes mid-copy is returned to the inbox, never archived torn."""
    h = daemon_factory()
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "stage-copied", "NBANKD_PAUSE_UNTIL": str(go)})
    h.drop("live.wav", b"first half ")
    claimed = wait_for(
        lambda: [p for p in work_entries(h.inbox / ".nbank") if p.is_file()],
        30,
        "the file to be claimed",
    )[0]
    with open(claimed, "ab") as f:  # the rig is still writing
        f.write(b"second half")
    go.touch()
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["live.wav"].read_bytes() == b"first half second half"
    assert [r["sha1"] for r in h.receipts()] == [
        hashlib.sha1(b"first half second half").hexdigest()
    ]


def test_unprivileged_daemon_deposits_and_rejects_unreadable_file(
    daemon_factory: Any, unpriv_user: Any, other_user: Any
) -> None:
    """Run as a service user, nbankd deposits readable files and rejects unreadable ones."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    h.drop("ok.wav", b"readable")
    secret = h.drop("private.wav", b"owner only")
    os.chown(secret, other_user.uid, other_user.gid)
    secret.chmod(0o600)
    h.wait_settled(2)
    h.stop()
    assert h.archive_files()["ok.wav"].read_bytes() == b"readable"
    [reason] = h.reasons()
    assert reason["code"] == "unreadable"
    rejected = Path(reason["rejected_path"])
    assert rejected.read_bytes() == b"owner only"
    assert rejected.stat().st_uid == other_user.uid
    config = json.loads((h.archive / "nbank.json").read_text())
    assert config["policy"]["access"]["user"] == unpriv_user.name
    assert h.archive_files()["ok.wav"].stat().st_uid == unpriv_user.uid


def test_sighup_sends_reloading_then_ready_and_applies_registry_url(daemon_factory: Any) -> None:
    """SIGHUP brackets the reload with RELOADING=1 / READY=1 and reopens the registry
    (the archive's nbank.json keeps the file: address, listed as an alias)."""
    h = daemon_factory()
    h.write_config()
    h.start()
    cfg = yaml.safe_load(h.config_path.read_text())
    cfg["registry_url"] = "https://lab.example.org/neurobank/"
    cfg["registry_aliases"] = [h.registry_address]
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.messages.clear()
    h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    h.wait_message(lambda m: "RELOADING=1" in m, 20)
    h.wait_message(lambda m: "READY=1" in m, 20)
    h.drop("after.wav", b"after the reload")
    h.wait_settled(1)
    h.stop()
    [receipt] = h.receipts()
    assert receipt["url"] == "https://lab.example.org/neurobank/resources/after/"


def test_archive_naming_another_registry_gets_no_deposits(daemon_factory: Any) -> None:
    """An archive whose nbank.json names another registry takes nothing: status says
    why and the input waits in the inbox; once the registry is served at that address
    (nbank.json writes it in capitals, with the default port and no trailing slash),
    the input is deposited."""
    h = daemon_factory()
    h.write_config()
    create_archive(h.archive, "HTTPS://Other.Example.org:443/neurobank")
    h.start()
    src = h.drop("elsewhere.wav", b"for another registry")

    def refused() -> list[str]:
        return [d for d in status_json(h)[1]["degraded"] if "names the registry" in d]

    [line] = wait_for(refused, 30, "status to name the other registry")
    assert "HTTPS://Other.Example.org:443/neurobank" in line
    assert src.read_bytes() == b"for another registry" and h.receipts() == []
    cfg = yaml.safe_load(h.config_path.read_text())
    cfg["registry_url"] = "https://other.example.org/neurobank/"
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    h.wait_settled(1)
    assert h.receipts()[0]["url"] == "https://other.example.org/neurobank/resources/elsewhere/"
    h.stop()


def test_file_in_a_folder_the_daemon_cannot_write_waits_named_and_is_deposited_once_fixed(
    daemon_factory: Any, unpriv_user: Any
) -> None:
    """A file in an inbox sub-folder the daemon's user cannot write waits untouched with
    code inbox-not-writable naming the folder, and is deposited once the folder is fixed."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    src = h.drop("locked/rec.wav", b"cannot move me")  # the folder is root's, mode 0755
    ctl = str(Path(sys.executable).with_name("nbankctl"))

    def waiting_status() -> Any:
        proc = subprocess.run(
            [ctl, "-c", str(h.config_path), "queue", "--json"], capture_output=True, text=True
        )
        return "inbox-not-writable" in proc.stdout and proc.stdout

    queue = wait_for(waiting_status, what="the item to wait with code inbox-not-writable")
    assert str(src.parent) in queue
    assert src.read_bytes() == b"cannot move me" and h.archive_files() == {}
    os.chown(src.parent, unpriv_user.uid, unpriv_user.gid)
    subprocess.run([ctl, "-c", str(h.config_path), "rescan"], check=True, capture_output=True)
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["rec.wav"].read_bytes() == b"cannot move me"
    assert not src.exists()


def test_explain_names_a_folder_the_daemon_cannot_search(
    daemon_factory: Any, unpriv_user: Any
) -> None:
    """explain of a file inside a folder the daemon's user cannot search says which folder
    hides it and what to do, not "nothing there"."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    src = h.drop("private/rec.wav", b"out of sight")
    src.parent.chmod(0o700)  # root's folder: the daemon's user cannot look inside
    ctl = str(Path(sys.executable).with_name("nbankctl"))
    proc = subprocess.run(
        [ctl, "-c", str(h.config_path), "explain", str(src), "--json"],
        capture_output=True,
        text=True,
    )
    h.stop()
    answer = json.loads(proc.stdout)
    assert answer["state"] == "hidden", answer
    assert str(src.parent) in answer["message"] and "permission" in answer["message"]
    assert src.read_bytes() == b"out of sight"


def test_rejected_input_named_like_a_temporary_reason_file_survives_later_rejections(
    daemon_factory: Any,
) -> None:
    """An input called `.a.wav.reason.tmp` (with no ignore patterns) is rejected under
    another name, so rejecting `a.wav` later, which writes and cleans up that temporary
    name, leaves its bytes intact."""
    h: DaemonHarness = daemon_factory(inbox_options={"ignore": []})
    h.start()
    h.drop(".a.wav.reason.tmp", b"keep me")
    h.wait_settled(1)
    h.drop("a.wav", b"")  # zero bytes: rejected too, its reason written via the temp name
    h.wait_settled(2)
    h.stop()
    kept = {p.name: p.read_bytes() for p in h.rejected.iterdir() if not p.name.endswith(".reason")}
    assert kept == {".a.wav.reason.tmp~1": b"keep me", "a.wav": b""}
    assert {r["code"] for r in h.reasons()} == {"invalid-name", "empty"}


def test_nested_rejected_dir_hides_only_itself(daemon_factory: Any) -> None:
    """With rejected_dir: sub/rejected, files elsewhere in sub/ are still deposited."""
    h = daemon_factory(inbox_options={"rejected_dir": "sub/rejected"})
    h.start()
    h.drop("sub/beside.wav", b"next to the rejected folder")
    wait_for(lambda: len(h.receipts()) == 1, what="sub/beside.wav to be deposited")
    h.stop()
    assert h.archive_files()["beside.wav"].read_bytes() == b"next to the rejected folder"


def _reload_with(h: DaemonHarness, change: Callable[[dict[str, Any]], None]) -> str:
    """Rewrites the configuration with ``change`` applied, reloads (SIGHUP) and waits
    for the reload to be logged; returns the previous configuration's text."""
    good = h.config_path.read_text()
    cfg = yaml.safe_load(good)
    change(cfg)
    h.config_path.write_text(yaml.safe_dump(cfg))
    before = h.log_path.read_text().count("configuration reloaded")
    h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(
        lambda: h.log_path.read_text().count("configuration reloaded") > before, 30, "the reload"
    )
    return good


def test_item_in_flight_finishes_by_its_intent_after_its_inbox_is_removed(
    daemon_factory: Any,
) -> None:
    """An inbox dropped by a reload while its input is in flight: the input finishes by
    its journaled intent (its archive is still configured), never rejected."""
    h = daemon_factory()
    h.write_config()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(release)})
    h.drop("intent01.dat", b"in flight across a reload")
    wait_for(lambda: any(work_entries(h.inbox / ".nbank")), 30, "the input to be claimed")

    def other_inbox(cfg: dict[str, Any]) -> None:
        cfg["inboxes"][0]["path"] = str(h.root / "other-inbox")

    _reload_with(h, other_inbox)
    release.touch()
    wait_for(lambda: len(h.receipts()) == 1, 60, "the input to be deposited")
    h.stop()
    assert h.reasons() == []
    assert h.archive_files()["intent01.dat"].read_bytes() == b"in flight across a reload"
    assert not any(work_entries(h.inbox / ".nbank"))


def _second_archive(h: DaemonHarness, cfg: dict[str, Any]) -> Path:
    other = h.root / "archive-b"
    cfg["archives"].append({"path": str(other), "name": "b" + h.archive_name, "create": True})
    cfg["inboxes"][0]["archive"] = "b" + h.archive_name
    return other


def test_reload_never_reroutes_an_item_in_flight(daemon_factory: Any) -> None:
    """Registered in archive A, then the inbox is re-pointed at archive B by a reload:
    the item finishes in A (file, registry location, receipt), B gets nothing, and no
    staged copy is left behind in A."""
    h = daemon_factory()
    h.write_config()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-register", "NBANKD_PAUSE_UNTIL": str(release)})
    h.drop("route01.dat", b"registered in A")

    def registered() -> bool:
        with h.open_registry() as reg:
            return reg.get_resource("route01") is not None

    wait_for(registered, 30, "the record (the worker then holds before journaling it)")
    other: list[Path] = []
    _reload_with(h, lambda cfg: other.append(_second_archive(h, cfg)))
    release.touch()
    wait_for(lambda: len(h.receipts()) == 1, 60, "the input to be deposited")
    h.stop()
    [receipt] = h.receipts()
    assert receipt["archive"] == h.archive_name
    assert h.archive_files()["route01.dat"].read_bytes() == b"registered in A"
    assert list((other[0] / "resources").iterdir()) == []
    assert list((h.archive / "staging").iterdir()) == []
    with h.open_registry() as reg:
        record = reg.get_resource("route01")
    assert record is not None and record.locations == (h.archive_name,)


def test_item_whose_archive_is_removed_by_reload_is_parked_then_finished(
    daemon_factory: Any,
) -> None:
    """An archive removed by a reload while an input registered in it is in flight parks
    the input (status names it, code parked), never sends it elsewhere or rejects it;
    restored, the input is deposited in it once. (An input with nothing registered yet
    is decided again instead: tests/daemon/test_reload_archives.py.)"""
    h = daemon_factory()
    h.write_config()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-register", "NBANKD_PAUSE_UNTIL": str(release)})
    h.drop("parked01.dat", b"in flight across a reload")

    def registered() -> bool:
        with h.open_registry() as reg:
            return reg.get_resource("parked01") is not None

    wait_for(registered, 30, "the record (the worker then holds before journaling it)")

    def only_b(cfg: dict[str, Any]) -> None:
        _second_archive(h, cfg)
        del cfg["archives"][0]

    good = _reload_with(h, only_b)
    release.touch()

    def parked() -> list[str]:
        return [d for d in status_json(h)[1]["degraded"] if "after parked" in d]

    [line] = wait_for(parked, 30, "status to show the parked input")
    assert str(h.inbox) in line and h.archive_name in line
    assert h.reasons() == [] and h.receipts() == []
    h.config_path.write_text(good)
    h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: len(h.receipts()) == 1, 90, "the parked input to be deposited")
    assert h.reasons() == []
    assert h.archive_files()["parked01.dat"].read_bytes() == b"in flight across a reload"
    h.stop()


def test_a_damaged_journal_stops_the_start_with_a_clear_message(daemon_factory: Any) -> None:
    """A journal that is not a database stops nbankd with exit 2 naming the file and
    what to do, without a traceback; the file is left as it was."""
    h = daemon_factory()
    h.write_config()
    h.state_dir.mkdir()
    journal = h.state_dir / "journal.sqlite3"
    journal.write_bytes(b"not a database, just bytes" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    proc = subprocess.run(
        [NBANKD, "-c", str(h.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"the journal {journal} cannot be read" in proc.stderr
    assert "restore state_dir from its backup" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert journal.read_bytes() == b"not a database, just bytes" * 100


def test_a_file_deeper_than_path_max_is_reported_not_ignored(daemon_factory: Any) -> None:
    """A file below a path longer than PATH_MAX cannot be deposited; status says so
    (degraded, naming where), and the daemon goes on depositing the rest."""
    h = daemon_factory()
    h.start()
    fd = os.open(h.inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(24):  # 24 x 200 bytes: past PATH_MAX (4096)
            os.mkdir("d" * 200, dir_fd=fd)
            nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        deep = os.open("deep.dat", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(deep, b"too deep to reach by path")
        os.close(deep)
    finally:
        os.close(fd)
    h.drop("shallow.dat", b"deposited as usual")
    h.wait_settled(1)

    def reported() -> list[str]:
        return [d for d in status_json(h)[1]["degraded"] if "cannot be read" in d]

    [line] = wait_for(reported, 30, "status to report the unreadable deep folder")
    assert str(h.inbox) in line and "too long" in line
    assert [r["id"] for r in h.receipts()] == ["shallow"]
    h.stop()


def test_input_whose_folder_is_removed_before_the_claim_is_cancelled(daemon_factory: Any) -> None:
    """Journaled, then its whole folder removed before the claim: the item is cancelled
    (nothing to take), not left waiting on a misleading archive error."""
    import sqlite3

    h = daemon_factory()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(release)})
    h.drop("gone/sub/late.dat", b"removed with its folder")

    def states() -> list[str]:
        db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            return [r[0] for r in db.execute("SELECT state FROM items")]
        finally:
            db.close()

    wait_for(lambda: states() == ["claiming"], 30, "the intent to be journaled")
    shutil.rmtree(h.inbox / "gone")
    release.touch()
    wait_for(lambda: states() == ["cancelled"], 30, "the item to be cancelled")
    code, doc = status_json(h)
    assert (code, doc["degraded"]) == (0, [])
    h.stop()


def test_status_shows_what_each_archive_filesystem_can_do(daemon_factory: Any) -> None:
    """The daemon probes its archive at start: status lists its filesystem's features
    (all present on a local disk) and no note, and nothing is left in staging/."""
    h = daemon_factory()
    h.start()
    _code, status = status_json(h)
    caps = status["archive_filesystems"][h.archive_name]
    assert caps["fs_type"] and {k: v for k, v in caps.items() if k != "fs_type"} == {
        "hard_links": True, "rename_noreplace": True, "o_direct": True, "flock": True,
        "notes": [],
    }  # fmt: skip
    assert not [p for p in (h.archive / "staging").iterdir() if "probe" in p.name]
    h.stop()
