"""Hostile review of whether ``nbankctl status`` (text and --json), ``nbankctl explain``,
the metrics and the alerts tell the truth: every situation in which an input is not
being deposited must make status degraded (exit 1, a line naming where and what to do)
and, after its delay, be told by an alert; and status must not say degraded when all is
well. Real daemons (tests/fixtures/daemon.py), real nbankctl, a real webhook receiver.

Tests named ``test_guard_*`` pass on the code as reviewed (what held); every other test
fails on it, its docstring naming the behaviour expected."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from fixtures.readers import plugin_package
from fixtures.webhooks import Hook
from nbankd.readerbox import landlock_abi


def _alerts(hook: Hook, **extra: str) -> dict[str, Any]:
    return {
        "webhook": {"url": hook.url},
        "check_every": "0.3s",
        "group_wait": "0s",
        "unavailable_after": "1s",
        **extra,
    }


# -- a metadata reader plugin that "touches" the file it reads -------------------------

READERS = """
from pathlib import Path

def touching(path):
    # marks the file it read as read, as "touch" would (utime: Landlock cannot deny it)
    Path(path).touch()
    return {"indexed": 1}
"""


def reader_package(root: Path) -> Path:
    """Writes the package statustruthreaders (its module and dist-info) into ``root``."""
    return plugin_package(
        root,
        "statustruthreaders",
        READERS,
        "[nbank.metadata_readers]\ntouch-rec = statustruthreaders:touching\n",
    )


landlock = pytest.mark.skipif(landlock_abi()[0] < 3, reason="needs Landlock ABI 3")


def _put_back(h: DaemonHarness, name: str) -> int:
    return sum(1 for r in h.journal_rows() if r["relpath"] == name and r["state"] == "returned")


# -- an input put back and claimed again for ever -------------------------------------------


@landlock
def test_an_input_a_reader_changes_every_time_makes_status_degraded(
    daemon_factory: Any, hook: Hook
) -> None:
    """Placed by rename, an input whose metadata reader sets its times at every read is
    put back and claimed again for ever (README: "the input waits, naming the reader";
    it loops instead, a new journal item each time, its attempts never growing): status
    must be degraded naming the reader, an alert must tell it, and explain must say why
    it is not deposited (it says "settling" or "ready")."""
    h: DaemonHarness = daemon_factory(
        dtype="touch-rec",
        inbox_options={"placement": "rename", "settle_seconds": 0.2, "expect_every": "1s"},
        extra_config={"alerts": _alerts(hook, repeat_every="1s")},  # "silent": the clock
    )
    h.start(env={"PYTHONPATH": str(reader_package(h.root / "plugins"))})
    h.drop("song.wav", b"RIFF" + b"recording " * 100)

    def reader_runs() -> int:
        return h.log_path.read_text(errors="replace").count("changed the file it was given")

    wait_for(lambda: reader_runs() >= 3, 60, "the reader to change the input three times")
    seen = len(hook.posts)
    wait_for(lambda: len(hook.posts) >= seen + 3, 30, "three more alert checks")
    code, doc = status_json(h)
    explained = json.loads(nbankctl(h, "explain", str(h.inbox / "song.wav"), "--json").stdout)
    told = [a["summary"] for a in hook.alerts(seen) if a["kind"] != "silent"]
    h.stop()
    assert h.receipts() == []  # never deposited
    wrong = []
    if code != 1 or not any("touch-rec" in line for line in doc["degraded"]):
        wrong.append(f"status exit {code}, degraded {doc['degraded']}")
    if not any("song.wav" in s or "touch-rec" in s for s in told):
        wrong.append(f"alerts told only {told}")
    if "changed the file it was given to read" not in json.dumps(explained):
        wrong.append(f"explain says {explained.get('message')!r}")
    assert not wrong, f"put back {_put_back(h, 'song.wav')} times: " + "; ".join(wrong)


# -- a reload by SIGHUP (systemctl reload) that failed -------------------------------------


def test_a_failed_sighup_reload_makes_status_degraded(daemon_factory: Any) -> None:
    """``systemctl reload nbankd`` (the unit's ExecReload is kill -HUP) of a file the
    daemon cannot apply keeps the running configuration: the rig just added to it is
    never watched and its recordings are never deposited. Status must say so (degraded,
    naming why the reload failed) until a reload succeeds, not report healthy."""
    h: DaemonHarness = daemon_factory()
    h.start()
    rig4, rig5 = h.root / "rig4", h.root / "rig5"
    rig4.mkdir()
    (rig4 / "take1.wav").write_bytes(b"rig4's first recording")
    rig5.write_text("a file where the lab meant a folder")  # nbankctl's check cannot see it

    def add_rigs(cfg: dict[str, Any]) -> None:
        for rig in (rig4, rig5):
            cfg["inboxes"].append({"path": str(rig), "archive": h.archive_name, "dtype": h.dtype})

    h.edit_config(add_rigs)
    assert h.proc is not None
    h.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in h.log_path.read_text(errors="replace"), 30, "the reload")
    code, doc = status_json(h)
    text = nbankctl(h, "status")
    h.stop()
    assert (rig4 / "take1.wav").exists() and h.receipts() == []  # never picked up
    assert code == 1 and any("rig5" in line for line in doc["degraded"]), (
        f"status exit {code} after a failed reload: {doc['degraded']}"
    )
    assert text.returncode == 1 and "rig5" in text.stdout, text.stdout


# -- an input the registry keeps failing while other deposits succeed ------------------------


def _attempts(h: DaemonHarness, name: str) -> tuple[int, float]:
    """(attempts, seconds until its next attempt) of ``name``'s item in flight."""
    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute(
            "SELECT attempts, not_before FROM items WHERE relpath = ? AND state NOT IN "
            "('done', 'rejected', 'returned', 'cancelled')",
            (name.encode(),),
        ).fetchone()
    finally:
        db.close()
    return (0, 0.0) if row is None else (int(row[0]), float(row[1]) - time.time())


def test_an_input_the_registry_keeps_failing_is_told_while_others_deposit(
    daemon_factory: Any, django_registry: Any, fault_proxy: Any, hook: Hook
) -> None:
    """One input's registration keeps failing (the registry answers 500 for its record:
    a server bug on its metadata, a proxy rule) while the other inputs deposit. Status
    says "registry: 1 input(s) waiting after registry-unavailable", but the alerts leave
    such an input to the registry's outage alert, which the next successful deposit
    switches off: the input waiting for ever must still be told (as stuck, or as the
    registry's problem). (Here every registration fails, except while the failing
    input's backoff leaves time for another input's deposit.)"""
    h: DaemonHarness = daemon_factory(
        registry=fault_proxy.url,
        auth=django_registry.auth,
        inbox_options={"expect_every": "1s"},  # a "silent" alert repeated every 1 s:
        extra_config={"alerts": _alerts(hook, repeat_every="1s")},  # the test's clock
    )
    h.dtype = django_registry.add_datatype(content_type="application/octet-stream")
    h.start()
    fault_proxy.inject("error500", methods={"POST"}, path_contains="/resources/")
    h.drop("badrec.dat", os.urandom(3000))
    # its fifth failure in a row: the next attempt is 16-17 s away (backoff 1, 2, 4, 8, 16 s)
    wait_for(lambda: _attempts(h, "badrec.dat")[0] >= 5, 60, "five failed registrations")
    attempts, next_in = _attempts(h, "badrec.dat")
    assert next_in > 12, next_in
    fault_proxy.clear()  # the registry takes the other inputs' records (not badrec's)
    h.drop("good.dat", os.urandom(3000))
    h.wait_settled(1)
    fault_proxy.inject("error500", methods={"POST"}, path_contains="/resources/")
    assert [r["id"] for r in h.receipts()] == ["good"], "badrec went through: rerun"
    seen = len(hook.posts)
    wait_for(lambda: len(hook.posts) >= seen + 4, 30, "four more alert checks")
    code, doc = status_json(h)
    assert _attempts(h, "badrec.dat")[0] == attempts  # not tried again while watched
    h.stop()
    # every problem still there is repeated every second (repeat_every): what fires now
    firing = {
        f"{a['kind']}: {a['summary']}"
        for a in hook.alerts(seen + 2)
        if a["state"] == "firing" and a["kind"] != "silent"
    }
    assert code == 1 and any("registry-unavailable" in line for line in doc["degraded"]), doc
    assert any("badrec" in s or s.startswith("registry:") for s in firing), (
        f"status says {doc['degraded']}; alerts firing: {sorted(firing)}"
    )


# -- an input a bug outside its steps keeps failing -------------------------------------


def test_an_input_a_bug_keeps_failing_outside_its_steps_makes_status_degraded(
    daemon_factory: Any,
) -> None:
    """An unexpected error raised outside a step (here in the lane's round, after its
    fsyncs: NBANKD_RAISE_AT stands in for a bug) leaves the input registered and never
    published, retried every 5 s to 300 s for ever. Its journal row keeps no error code
    and no attempt, so status (exit 0, no line), the stuck alert and the metrics ignore
    it; only last_error, overwritten by the next error, tells. Status must be degraded
    naming the input (as a bug inside a step is: code ``internal``)."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_RAISE_AT": "after-round-fsyncs"})
    h.drop("small.wav", b"a small recording, moved by the lane")
    wait_for(
        lambda: h.log_path.read_text(errors="replace").count("unexpected error in a deposit") >= 2,
        60,
        "the bug to fail the input twice",
    )
    code, doc = status_json(h)
    rows = h.journal_rows()
    h.stop()
    assert h.receipts() == [] and [r["state"] for r in rows] == ["registered"]
    named = [line for line in doc["degraded"] if "small.wav" in line or "internal" in line]
    assert code == 1 and named, (
        f"status exit {code}, degraded {doc['degraded']}, last_error {doc['last_error']}"
    )


# -- a worker stuck inside a step ---------------------------------------------------------


def test_a_worker_stuck_in_a_step_makes_status_degraded(daemon_factory: Any) -> None:
    """A worker of the pool wedged inside a step (a write to a hung NFS archive;
    NBANKD_HANG_AT stands in for it) holds its input for ever. The daemon counts it
    wedged after ``wedge_after`` (NBANKD_WEDGE_AFTER, 1 s here) and only withholds
    systemd's watchdog ping, when there is a watchdog; status must say so too
    (degraded, naming the step or the input), as it does for the lane of small files."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_HANG_AT": "after-stage", "NBANKD_WEDGE_AFTER": "1"})
    h.drop("big.wav", os.urandom(2 << 20))  # past the lane's 1 MiB: a worker of the pool
    wait_for(
        lambda: (h.inbox / ".nbank").is_dir() and len(list((h.inbox / ".nbank").iterdir())) > 1,
        30,
        "the input to be claimed",
    )

    def degraded() -> bool:
        return status_json(h)[0] == 1

    try:
        wait_for(degraded, 60, "status to say a worker is stuck")
    except AssertionError:
        code, doc = status_json(h)
        h.kill9()
        raise AssertionError(
            f"a worker stuck in a step for 60 s (wedge_after 1 s): status exit {code}, "
            f"degraded {doc['degraded']}, queue {doc['queue']}"
        ) from None
    h.kill9()


# -- where a waiting input's error is told -------------------------------------------------


def test_a_staged_copy_replaced_in_the_archive_is_told_against_the_archive() -> None:
    """A staged copy replaced in the archive's group-writable staging/ (code
    ``staged-changed``, which waits longer each time, as a bad read-back does) is the
    archive's problem: status names the archive (not the inbox, whose files are fine)
    and nbankd_archive_errors_total counts it, as for ``verify-failed``."""
    from dataclasses import replace

    from nbankd.daemon.status import waiting_problems
    from nbankd.daemon.tally import Tally
    from nbankd.deposit.item import Item
    from nbankd.deposit.lifecycle import State as ItemState

    base = Item(
        id=1, token="tok1", inbox="/srv/inbox/rig3", relpath=b"take.wav", kind="file",
        state=ItemState.CLAIMED, archive="birdsong", archive_path="/srv/birdsong",
        placement="copy", verify=True, created=0.0, updated=0.0,
    )  # fmt: skip
    lines, archive_errors = {}, {}
    for code in ("verify-failed", "staged-changed"):
        item = replace(
            base,
            attempts=2,
            error_code=code,
            error_message="/srv/birdsong/staging/x is not the staged copy nbankd wrote",
        )
        [lines[code]] = waiting_problems([item])
        tally = Tally()
        tally.record(item, attempts_before=1)
        archive_errors[code] = tally.archive_errors["birdsong"]
    assert lines["staged-changed"].startswith("archive birdsong"), lines
    assert archive_errors["staged-changed"] == archive_errors["verify-failed"] == 1, archive_errors


# -- a rejected input whose .reason file was removed ------------------------------------------


def test_a_rejected_input_without_its_reason_file_keeps_status_degraded(
    daemon_factory: Any,
) -> None:
    """README: status is degraded by "any file in a rejected folder". A rejected
    recording whose NAME.reason a lab member deleted (clutter, they thought) is still
    the only copy, never deposited: status must stay degraded naming it (it says
    healthy, and the rejection's alert is resolved), as explain still calls it rejected
    (from the journal's copy of its reason)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("bad name.wav", b"a recording whose name the registry refuses")
    h.wait_settled(1)
    assert status_json(h)[0] == 1
    [reason] = list(h.rejected.glob("*.reason"))
    reason.unlink()
    code, doc = status_json(h)
    explained = nbankctl(h, "explain", str(h.rejected / "bad name.wav"), "--json")
    h.stop()
    assert (h.rejected / "bad name.wav").exists()
    assert json.loads(explained.stdout)["state"] == "rejected"
    assert code == 1 and any("rejected" in line for line in doc["degraded"]), (
        f"a recording left in {h.rejected}: status exit {code}, degraded {doc['degraded']}"
    )


def test_a_rejected_folder_the_daemon_cannot_read_is_not_counted_empty(
    daemon_factory: Any, unpriv_user: Any
) -> None:
    """A rejected folder holding a rejected recording, whose mode a lab member tightened
    (chmod 000: the daemon's user can no longer list it), is not an empty rejected
    folder: status must stay degraded (naming the folder it cannot read), not count 0
    rejected inputs, report healthy and resolve the rejection's alert."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    h.drop("bad name.wav", b"a recording whose name the registry refuses")
    os.chown(h.inbox / "bad name.wav", unpriv_user.uid, unpriv_user.gid)
    h.wait_settled(1)
    assert status_json(h)[0] == 1
    mode = h.rejected.stat().st_mode
    h.rejected.chmod(0)
    try:
        code, doc = status_json(h)
    finally:
        h.rejected.chmod(mode)
        h.stop()
    waiting = [e["in_rejected_folder"] for e in doc["inboxes"]]
    assert code == 1 and doc["degraded"], (
        f"rejected folder unreadable: status exit {code}, rejected inputs {waiting}, "
        f"degraded {doc['degraded']}"
    )


# -- guard tests: these held up (they pass) -----------------------------------------------


def test_guard_a_healthy_or_paused_daemon_is_not_degraded(daemon_factory: Any) -> None:
    """GUARD (passes): after a deposit, and with the inbox paused, status (text and
    --json) exits 0 and says healthy; a dropped file waits as paused in explain."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("take1.wav", b"a recording")
    h.wait_settled(1)
    results = []
    for paused in (False, True):
        if paused:
            assert nbankctl(h, "pause").returncode == 0
            h.drop("take2.wav", b"another recording")
            wait_for(
                lambda: (
                    json.loads(nbankctl(h, "explain", str(h.inbox / "take2.wav"), "--json").stdout)[
                        "state"
                    ]
                    == "paused"
                ),
                30,
                "the new file to be ready and held by the pause",
            )
        text, doc = nbankctl(h, "status"), status_json(h)
        results.append((text.returncode, "healthy" in text.stdout, doc[0], doc[1]["healthy"]))
    h.stop()
    assert results == [(0, True, 0, True)] * 2, results
