"""Hostile review of session 27's fixes: inputs held beside an nbankd ``NAME.reason``
found outside the rejected folders (2aa8858), a requeue without the journal from the
top of the rejected folder (a3dd9e4), and registry export/import with metadata no
registry stores (d087f98).

Real daemons, real files, the embedded registry and the django-neurobank fixture; no
mocks. A strict xfail is a finding, confirmed to fail for the reason it gives.

Findings, fixed since: an input held for a ``NAME.reason`` beside it (planted, or
its rejected folder renamed) was in no status line, status healthy (now counted and
named per inbox, status degraded; and a reason holds its input only when it is
plausibly nbankd's: its rejected path in a rejected folder, or the journal has the
rejection or cannot tell); a sidecar holding a lone surrogate failed its claim with an
internal error retried for ever (now rejected as ``bad-sidecar`` naming the key);
metadata nested about 990 deep made ``registry export`` a RecursionError traceback
(now warned of as nested too deep, or, past what JSON reads, the export ends naming
the resource; an import line that deep is refused naming the line).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fixtures.cli_backends import NBANKCTL, base_env
from fixtures.daemon import DaemonHarness, more_scans, nbankctl, status_json, wait_for
from fixtures.django_server import DjangoServer, unique_name
from nbankd.migration import snapshot
from nbankd.registry.embedded import EmbeddedRegistry


def _forged_reason(h: DaemonHarness, rel: str, original: str | None = None) -> bytes:
    """A ``NAME.reason`` as nbankd writes one, for an input at ``rel`` of the inbox."""
    body = {
        "code": "sidecar-invalid",
        "message": "forged",
        "original_path": original or str(h.inbox / rel),
        "rejected_path": str(h.rejected / os.path.basename(rel)),
    }
    return json.dumps(body).encode()


def _status_text(h: DaemonHarness) -> str:
    proc = nbankctl(h, "status", timeout=60)
    return proc.stdout + proc.stderr


# --- 2aa8858: held beside a reason ------------------------------------------------------


def test_a_reason_planted_beside_anothers_recording_does_not_hold_it_unseen(
    daemon_factory: Any,
) -> None:
    """A recording held for a NAME.reason beside it (planted, or moved back by hand) is
    named by ``nbankctl status``, so nobody waits blind for a deposit that never comes."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("rec.wav.reason", _forged_reason(h, "rec.wav"))
    h.drop("rec.wav", b"someone else's recording")
    h.drop("other.wav", b"a recording beside it")
    wait_for(lambda: h.receipt("other"), 60, "the other recording to be deposited")
    more_scans(h, 2)
    assert h.receipt("rec") is None  # held, by design
    assert (h.inbox / "rec.wav").read_bytes() == b"someone else's recording"
    _rc, doc = status_json(h)
    text = _status_text(h)
    assert "rec.wav" in text or "rec.wav" in json.dumps(doc), text


def _reason_elsewhere(h: DaemonHarness, time: str | None) -> bytes:
    """A reason with the three keys whose rejected path is in no rejected folder."""
    body = json.loads(_forged_reason(h, "rec.wav"))
    body["rejected_path"] = str(h.root / "elsewhere" / "rec.wav")
    if time is not None:
        body["time"] = time
    return json.dumps(body).encode()


def test_a_reason_naming_no_rejected_folder_does_not_hold(daemon_factory: Any) -> None:
    """A NAME.reason whose rejected path is in no rejected folder, written after the
    journal began and unknown to it, is no reason of nbankd's: the input beside it is
    deposited, and the reason taken in as an ordinary file."""
    h: DaemonHarness = daemon_factory(inbox_options={"auto_id": True})
    h.start()
    h.drop("first.wav", b"the journal's first input")
    h.wait_settled(1)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    reason = h.drop("rec.wav.reason", _reason_elsewhere(h, now))
    h.drop("rec.wav", b"the recording")
    h.wait_settled(3)
    assert h.reasons() == [], h.reasons()
    assert sorted(os.path.basename(r["source"]) for r in h.receipts()) == [
        "first.wav",
        "rec.wav",
        "rec.wav.reason",
    ]
    assert not os.path.lexists(reason)


def test_a_reason_naming_no_file_name_does_not_stop_the_scan(daemon_factory: Any) -> None:
    """A NAME.reason whose paths hold a surrogate no file name gives (``\\ud800``) is
    no reason of nbankd's: the input beside it is deposited, no traceback."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("first.wav", b"the journal's first input")
    wait_for(lambda: h.receipt("first"), 60, "the first input to be deposited")
    body = json.loads(_reason_elsewhere(h, datetime.now(UTC).isoformat(timespec="seconds")))
    body["original_path"] = str(h.inbox / "rec\ud800.wav")
    body["rejected_path"] += "\ud800"
    reason = h.drop("rec.wav.reason", json.dumps(body).encode())
    _deposited_beside(h, reason)
    assert b"Traceback" not in h.log_path.read_bytes()


def test_a_reason_the_journal_cannot_vouch_for_holds_and_is_told(daemon_factory: Any) -> None:
    """A NAME.reason in no rejected folder and older than the journal (a state_dir
    lost since?) holds the input beside it, which status names with what to do."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("rec.wav.reason", _reason_elsewhere(h, "2001-01-01T00:00:00+00:00"))
    h.drop("rec.wav", b"a rejected recording, its journal lost")

    def told() -> list[str]:
        _rc, doc = status_json(h)
        return [line for line in doc.get("degraded", []) if "rec.wav" in line]

    wait_for(told, 60, "status to name the held input")
    [line] = told()
    assert "delete" in line and "requeue" in line and str(h.rejected) in line, line
    _rc, doc = status_json(h)
    [inbox] = doc["inboxes"]
    assert (inbox["held_for_reason"], inbox["held_for_reason_first"]) == (1, ["rec.wav"])
    assert h.receipt("rec") is None
    assert (h.inbox / "rec.wav").read_bytes() == b"a rejected recording, its journal lost"


def _deposited_beside(h: DaemonHarness, reason: Path) -> None:
    """``rec.wav`` dropped beside ``reason`` (planted first) is deposited, and the daemon
    still answers."""
    h.drop("rec.wav", b"the recording")
    wait_for(lambda: h.receipt("rec"), 60, "the recording beside the odd reason")
    rc, _doc = status_json(h)
    assert rc in (0, 1, 2), rc
    assert not os.path.lexists(h.inbox / "rec.wav")


def test_a_fifo_named_as_the_reason_neither_hangs_nor_holds(daemon_factory: Any) -> None:
    """A FIFO named NAME.reason beside an input is never opened for reading: no hang,
    and the input is deposited (no reason nbankd wrote is there)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    fifo = h.inbox / "rec.wav.reason"
    os.mkfifo(fifo)
    _deposited_beside(h, fifo)


def test_a_link_to_a_real_reason_does_not_hold_the_input(daemon_factory: Any) -> None:
    """A NAME.reason that is a link (to a reason nbankd could have written) is not
    followed: the input beside it is deposited."""
    h: DaemonHarness = daemon_factory()
    h.start()
    real = h.root / "real.reason"
    real.write_bytes(_forged_reason(h, "rec.wav"))
    link = h.inbox / "rec.wav.reason"
    link.symlink_to(real)
    _deposited_beside(h, link)


def test_a_deeply_nested_reason_neither_crashes_the_scan_nor_holds(daemon_factory: Any) -> None:
    """A NAME.reason with the three keys and a value nested 200,000 levels deep (under
    its size limit) is no reason: the input is deposited, the scan goes on."""
    h: DaemonHarness = daemon_factory()
    h.start()
    body = json.loads(_forged_reason(h, "rec.wav"))
    text = json.dumps(body)[:-1] + ', "pad": ' + "[" * 200_000 + "]" * 200_000 + "}"
    h.drop("rec.wav.reason", text.encode())
    _deposited_beside(h, h.inbox / "rec.wav.reason")
    assert b"Traceback" not in h.log_path.read_bytes()


def test_a_huge_reason_is_not_read_whole_and_does_not_hold(daemon_factory: Any) -> None:
    """A 4 MiB NAME.reason (nbankd writes a few hundred bytes) is no reason nbankd
    wrote: the input beside it is deposited."""
    h: DaemonHarness = daemon_factory()
    h.start()
    body = json.loads(_forged_reason(h, "rec.wav"))
    body["message"] = "x" * (4 << 20)
    h.drop("rec.wav.reason", json.dumps(body).encode())
    _deposited_beside(h, h.inbox / "rec.wav.reason")


def _one_rejection(h: DaemonHarness) -> None:
    h.drop("trial7.nbank.yaml", b"id: [unclosed\n")  # a bad sidecar: rejected
    h.drop("trial7", b"the recording of trial 7")
    h.wait_settled(1)
    assert (h.rejected / "trial7.reason").exists()


def test_a_rejected_folder_renamed_while_running_stops_deposits_and_says_so(
    daemon_factory: Any,
) -> None:
    """The rejected folder renamed by a person while the daemon runs: status names the
    missing rejected folder, and nothing of the renamed folder is deposited."""
    h: DaemonHarness = daemon_factory()
    h.start()
    _one_rejection(h)
    (h.inbox / "rejected").rename(h.inbox / "rejected-old")
    h.drop("after.dat", b"dropped after the rename")

    def told() -> bool:
        _rc, doc = status_json(h)
        return str(h.rejected) in json.dumps(doc)

    wait_for(told, 60, "status to name the missing rejected folder")
    more_scans(h, 2)
    from_old = [r for r in h.receipts() if "/rejected-old/" in r["source"]]
    assert from_old == [], from_old
    old = h.inbox / "rejected-old"
    assert (old / "trial7").read_bytes() == b"the recording of trial 7"
    assert (old / "trial7.reason").exists() and (old / "trial7.nbank.yaml").exists()


def test_status_names_an_input_held_in_a_renamed_rejected_folder(daemon_factory: Any) -> None:
    """After the rejected folder was renamed, ``nbankctl status`` names the held input
    (or the folder), not only a log line once and explain for one who knows the path."""
    h: DaemonHarness = daemon_factory()
    h.start()
    _one_rejection(h)
    h.stop()
    (h.inbox / "rejected").rename(h.inbox / "rejected-old")
    h.start()
    more_scans(h, 3)
    _rc, doc = status_json(h)
    text = _status_text(h) + json.dumps(doc)
    assert "rejected-old" in text, text


def test_a_renamed_earlier_rejected_folder_is_held_by_the_journals_word(
    daemon_factory: Any,
) -> None:
    """An earlier rejected folder (rejected_dir changed since) renamed by a person is
    forgotten as a rejected folder; the journal still knows its rejection: held, and
    named by status."""
    h: DaemonHarness = daemon_factory()
    h.start()
    _one_rejection(h)
    h.stop()
    h.edit_config(lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    (h.inbox / "rejected").rename(h.inbox / "rejected-old")
    h.start()
    h.drop("after.dat", b"dropped after the rename")
    wait_for(lambda: h.receipt("after"), 60, "the file dropped after the rename")
    more_scans(h, 2)
    _rc, doc = status_json(h)
    [inbox] = doc["inboxes"]
    assert inbox["held_for_reason_first"] == ["rejected-old/trial7"], inbox
    assert [r for r in h.receipts() if "/rejected-old/" in r["source"]] == []
    assert (h.inbox / "rejected-old" / "trial7").read_bytes() == b"the recording of trial 7"


# --- a3dd9e4: a requeue without the journal from the top of the rejected folder --------


def _plant_top_rejected(h: DaemonHarness, original: Path) -> Path:
    """An input put by hand at the top of the rejected folder (no journal record), with
    a reason written for that very place naming ``original``."""
    h.rejected.mkdir(exist_ok=True)
    rejected = h.rejected / "x.wav"
    rejected.write_bytes(b"the rejected input")
    body = {
        "code": "sidecar-invalid",
        "message": "forged",
        "original_path": str(original),
        "rejected_path": str(rejected),
    }
    (h.rejected / "x.wav.reason").write_text(json.dumps(body))
    return rejected


def test_a_forged_reason_cannot_steer_a_requeue_through_a_link(daemon_factory: Any) -> None:
    """A forged reason naming inbox/lnk/sub/x.wav, lnk a link to a folder outside the
    inbox: the requeue refuses, nothing leaves the rejected folder, nothing lands outside."""
    h: DaemonHarness = daemon_factory()
    h.start()
    outside = h.root / "outside"
    (outside / "sub").mkdir(parents=True)
    (h.inbox / "lnk").symlink_to(outside)
    rejected = _plant_top_rejected(h, h.inbox / "lnk" / "sub" / "x.wav")
    proc = nbankctl(h, "requeue", str(rejected), timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and "internal" not in proc.stderr.lower(), proc.stderr
    assert list((outside / "sub").iterdir()) == []
    assert rejected.read_bytes() == b"the rejected input"
    assert (h.rejected / "x.wav.reason").exists()


def test_a_forged_reason_cannot_steer_a_requeue_over_a_file(daemon_factory: Any) -> None:
    """A forged reason naming a file that exists in the inbox: refused, that file and
    the rejected input unchanged."""
    h: DaemonHarness = daemon_factory()
    h.start()
    (h.inbox / "sub").mkdir()
    # a file the daemon never deposits (held open would be racy): a sidecar-less name
    # kept in the inbox by a pause
    assert nbankctl(h, "pause", "--json", timeout=60).returncode == 0
    keep = h.inbox / "sub" / "keep.wav"
    keep.write_bytes(b"someone's file")
    rejected = _plant_top_rejected(h, keep)
    proc = nbankctl(h, "requeue", str(rejected), timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "already exists" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert keep.read_bytes() == b"someone's file"
    assert rejected.read_bytes() == b"the rejected input"


def test_a_forged_reason_cannot_steer_a_requeue_into_the_work_folder(
    daemon_factory: Any,
) -> None:
    """A forged reason naming inbox/.nbank/x.wav: refused, the work folder untouched."""
    h: DaemonHarness = daemon_factory()
    h.start()
    work = h.inbox / ".nbank"
    before = sorted(p.name for p in work.iterdir())
    rejected = _plant_top_rejected(h, work / "x.wav")
    proc = nbankctl(h, "requeue", str(rejected), timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert sorted(p.name for p in work.iterdir()) == before
    assert rejected.read_bytes() == b"the rejected input"


# --- d087f98: metadata no registry stores -----------------------------------------------


def test_a_sidecar_with_a_lone_surrogate_is_rejected_naming_the_key(daemon_factory: Any) -> None:
    """A JSON sidecar holding a lone surrogate (embedded registry): the input is
    rejected, its reason names the key, input and sidecar kept byte for byte."""
    h: DaemonHarness = daemon_factory()
    h.start()
    sidecar = b'{"metadata": {"take": {"note": "a\\udc80b"}}}'
    h.drop("odd.wav.nbank.json", sidecar)
    h.drop("odd.wav", b"the odd recording")

    def ended() -> bool:  # rejected, or failing in a step (the journal says which)
        return bool(h.reasons()) or any(r["code"] for r in h.journal_rows())

    wait_for(ended, 60, "the input to be rejected or to fail a step")
    assert [r["code"] for r in h.journal_rows() if r["state"] != "rejected"] == []
    h.wait_settled(1)
    [reason] = h.reasons()
    assert "take.note" in reason.get("message", ""), reason
    assert (h.rejected / "odd.wav").read_bytes() == b"the odd recording"
    assert (h.rejected / "odd.wav.nbank.json").read_bytes() == sidecar


def test_a_file_whose_name_is_not_utf8_is_still_deposited(daemon_factory: Any) -> None:
    """A name with a byte that is not UTF-8 (a lone surrogate in Python) is deposited by
    the embedded registry: the refusal of such metadata never reaches file names."""
    h: DaemonHarness = daemon_factory(inbox_options={"auto_id": True})
    h.start()
    h.drop(b"take\xff.wav", b"a recording with a latin-1 name")
    h.wait_settled(1)
    assert h.reasons() == [], h.reasons()
    assert len(h.receipts()) == 1


def _deep_registry(tmp: Path, depth: int) -> Path:
    """An embedded registry with one record whose metadata is nested ``depth`` deep (set
    in its database, as an older version or an administrator could); its config."""
    reg = EmbeddedRegistry(tmp / "state" / "registry.sqlite3")
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_archive("arch", "neurobank", "/data/arch")
    reg.add_resource(dtype="wav", archive="arch", name="deep", sha1="a" * 40, metadata={})
    reg.add_resource(dtype="wav", archive="arch", name="fine", sha1="b" * 40)
    reg.close()
    nested = '{"a": ' * depth + "1" + "}" * depth
    with sqlite3.connect(tmp / "state" / "registry.sqlite3") as db:
        db.execute("UPDATE resource SET metadata = ? WHERE name = 'deep'", (nested,))
    db.close()
    config = tmp / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {tmp / 'state'}\n")
    return config


def test_an_export_of_deeply_nested_metadata_is_no_traceback(tmp_path: Path) -> None:
    """Metadata nested 990 deep (JSON reads it): the export writes it or names the
    resource, never a Python traceback from checking what no registry stores."""
    config = _deep_registry(tmp_path, 990)
    export = tmp_path / "export.jsonl"
    made = subprocess.run(
        [NBANKCTL, "-c", str(config), "registry", "export", "-o", str(export)],
        env=base_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in made.stderr and "RecursionError" not in made.stderr, made.stderr[
        -800:
    ]


def test_an_export_line_nested_too_deep_is_refused_naming_the_line(tmp_path: Path) -> None:
    """An export file with a line nested past what JSON reads: the import refuses it
    naming the file and the line, never a RecursionError traceback."""
    config = _deep_registry(tmp_path, 3)
    export = tmp_path / "export.jsonl"
    env = base_env(tmp_path / "home")
    made = subprocess.run(
        [NBANKCTL, "-c", str(config), "registry", "export", "-o", str(export)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    lines = export.read_text().splitlines()
    deep = json.loads(lines[3])
    assert deep["type"] == "resource", deep
    lines[3] = json.dumps(deep)[:-1] + ', "pad": ' + "[" * 5000 + "]" * 5000 + "}"
    export.write_text("\n".join(lines) + "\n")
    imported = subprocess.run(
        [NBANKCTL, "-c", str(config), "registry", "import", str(export), "--to", "http://x/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 2, imported.stdout + imported.stderr
    assert f"{export}:4: nested too deep" in imported.stderr, imported.stderr
    assert "Traceback" not in imported.stderr, imported.stderr[-800:]


def test_an_export_round_trips_through_django_neurobank(
    tmp_path: Path, django_registry: DjangoServer
) -> None:
    """Embedded export, imported into django-neurobank, exported from there: the same
    metadata (line separators, NEL, escapes, emoji, nesting), name and sha1."""
    server = django_registry
    dtype = server.add_datatype()
    archive = server.add_archive(str(tmp_path / "ar"))
    reg = EmbeddedRegistry(tmp_path / "state" / "registry.sqlite3")
    reg.add_datatype(dtype, "audio/wav", "wav")
    reg.add_archive(archive, "neurobank", str(tmp_path / "ar"))
    name = unique_name("rt")
    metadata = {
        "sep": "a\u2028b\u2029c\x85d",
        "esc": "\x1b[31m\r\n\t",
        "bird": "étourneau 🐦",
        "deep": {"x": [{"y": [1, 2.5, None, True]}]},
        "big": 10**20,
    }
    reg.add_resource(dtype=dtype, archive=archive, name=name, sha1="c" * 40, metadata=metadata)
    reg.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {tmp_path / 'state'}\n")
    env = base_env(tmp_path / "home")
    netrc = server.write_netrc(tmp_path / "netrc")
    first = tmp_path / "first.jsonl"
    made = subprocess.run(
        [NBANKCTL, "-c", str(config), "registry", "export", "-o", str(first)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    imported = subprocess.run(
        [
            NBANKCTL,
            "-c",
            str(config),
            "registry",
            "import",
            str(first),
            "--to",
            server.url,
            "--registry-auth",
            str(netrc),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    second = tmp_path / "second.jsonl"
    again = subprocess.run(
        [NBANKCTL, "-r", server.url, "registry", "export", "-o", str(second)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    [back] = [r for r in snapshot.load(second).resources if r.name == name]
    assert (back.sha1, back.dtype, back.metadata) == ("c" * 40, dtype, metadata)
