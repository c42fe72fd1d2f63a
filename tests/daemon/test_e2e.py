"""End to end: the real nbankd process deposits, rejects and recovers.

Each test starts ``nbankd`` as a subprocess, drops real files into its inbox and
checks archive, registry, receipts and the rejected folder, comparing bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, wait_for, work_entries
from nbankd.archive.staging import OVERLAP_FROM
from nbankd.names import CANARY_NAME

BACKENDS = ["embedded", "django"]


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, daemon_factory: Any) -> DaemonHarness:
    """A daemon configured for the embedded registry or the real django-neurobank."""
    if request.param == "embedded":
        return daemon_factory()
    server = request.getfixturevalue("django_registry")
    from nbankd.registry.http import HttpRegistry

    h = daemon_factory(registry=server.url, auth=(server.username, server.password))
    h.dtype = "dt" + h.archive_name
    with HttpRegistry(server.url, (server.username, server.password)) as reg:
        reg.add_datatype(h.dtype, "application/octet-stream")
    return h


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def stored_bytes(h: DaemonHarness, name: str) -> bytes:
    return h.archive_files()[name].read_bytes()


def reason_for(h: DaemonHarness, original_name: str) -> dict[str, Any]:
    for reason in h.reasons():
        if reason["original_name"] == original_name:
            return reason
    raise AssertionError(f"no reason for {original_name}: {h.reasons()}")


def test_dropped_file_is_deposited_registered_and_removed(harness: DaemonHarness) -> None:
    """A finished file ends in the archive with its registry record, receipt, and no source."""
    harness.start()
    data = os.urandom(200_000)
    src = harness.drop("rec001.wav", data)
    harness.wait_settled(1)
    harness.stop()
    [receipt] = harness.receipts()
    assert receipt["id"] == "rec001"
    assert receipt["sha1"] == sha1(data)
    assert stored_bytes(harness, "rec001.wav") == data
    assert not src.exists()
    with harness.open_registry() as reg:
        record = reg.get_resource("rec001")
    assert record is not None and record.sha1 == sha1(data)
    assert record.locations == (harness.archive_name,)
    assert receipt["url"] == reg.resource_url("rec001")


def test_a_file_past_the_overlapped_copy_size_is_deposited_intact(
    harness: DaemonHarness,
) -> None:
    """A file large enough for the overlapped copy (reading, hashing and writing at
    once) is stored byte for byte, with its SHA-1 in the receipt and the registry."""
    harness.start()
    data = os.urandom(OVERLAP_FROM + (3 << 20) + 12345)
    harness.drop("big001.dat", data)
    harness.wait_settled(1)
    harness.stop()
    [receipt] = harness.receipts()
    assert receipt["sha1"] == sha1(data) and receipt["size"] == len(data)
    assert stored_bytes(harness, "big001.dat") == data
    with harness.open_registry() as reg:
        record = reg.get_resource("big001")
    assert record is not None and record.sha1 == sha1(data)


def test_files_dropped_while_stopped_are_deposited_at_start(harness: DaemonHarness) -> None:
    """The start-up rescan catches inputs that arrived while the daemon was down."""
    harness.write_config()
    harness.inbox.mkdir(parents=True)
    payloads = {f"early{i}.dat": os.urandom(1000 + i) for i in range(5)}
    for name, data in payloads.items():
        harness.drop(name, data)
    harness.start()
    harness.wait_settled(5)
    harness.stop()
    for name, data in payloads.items():
        assert stored_bytes(harness, name) == data


@pytest.mark.parametrize(
    ("relpath", "code"),
    [
        ("with space.wav", "invalid-name"),
        ("ünïcode.wav", "invalid-name"),
        ("new\nline.wav", "invalid-name"),
        ("tilde~x.wav", "invalid-name"),
    ],
)
def test_invalid_names_are_rejected_with_their_bytes(
    daemon_factory: Any, relpath: str, code: str
) -> None:
    """A file whose name is no valid identifier goes to rejected/ intact, with a reason."""
    h = daemon_factory()
    h.start()
    data = os.urandom(5000)
    h.drop(relpath, data)
    h.wait_settled(1)
    h.stop()
    reason = reason_for(h, relpath)
    assert reason["code"] == code
    assert Path(reason["rejected_path"]).read_bytes() == data
    assert h.receipts() == []


def test_leading_dash_name_is_a_valid_identifier(daemon_factory: Any) -> None:
    """``-x.wav`` is a valid slug and is deposited as ``-x``."""
    h = daemon_factory()
    h.start()
    data = os.urandom(100)
    h.drop("-x.wav", data)
    h.wait_settled(1)
    h.stop()
    assert [r["id"] for r in h.receipts()] == ["-x"]
    assert stored_bytes(h, "-x.wav") == data


def test_zero_byte_file_is_rejected_as_empty(harness: DaemonHarness) -> None:
    """An empty file is rejected with code ``empty`` and kept."""
    harness.start()
    harness.drop("empty.wav", b"")
    harness.wait_settled(1)
    harness.stop()
    reason = reason_for(harness, "empty.wav")
    assert reason["code"] == "empty"
    assert Path(reason["rejected_path"]).read_bytes() == b""


def test_duplicate_content_is_rejected_naming_the_existing_id(harness: DaemonHarness) -> None:
    """Content already registered is rejected with code ``duplicate`` naming its identifier."""
    harness.start()
    data = os.urandom(4096)
    harness.drop("first.wav", data)
    harness.wait_settled(1)
    harness.drop("second.wav", data)
    harness.wait_settled(2)
    harness.stop()
    reason = reason_for(harness, "second.wav")
    assert reason["code"] == "duplicate"
    assert "first" in reason["message"]
    assert Path(reason["rejected_path"]).read_bytes() == data


def test_identifier_already_registered_is_rejected(harness: DaemonHarness) -> None:
    """A second file with a taken identifier but other content is rejected as name-taken."""
    harness.start()
    harness.drop("same.wav", b"one")
    harness.wait_settled(1)
    other = b"two, different bytes"
    harness.drop("same.wav", other)
    harness.wait_settled(2)
    harness.stop()
    reason = reason_for(harness, "same.wav")
    assert reason["code"] == "name-taken"
    assert Path(reason["rejected_path"]).read_bytes() == other
    assert stored_bytes(harness, "same.wav") == b"one"


def test_unknown_datatype_from_sidecar_is_rejected(harness: DaemonHarness) -> None:
    """A sidecar naming a datatype the registry lacks rejects the file as unknown-dtype."""
    harness.start()
    (harness.inbox / "odd.wav.nbank.yaml").write_text("dtype: no-such-dtype-xyz\n")
    harness.drop("odd.wav", b"data")
    harness.wait_settled(1)
    harness.stop()
    reason = reason_for(harness, "odd.wav")
    assert reason["code"] == "unknown-dtype"
    assert (Path(reason["rejected_path"]).parent / "odd.wav.nbank.yaml").exists()


def test_bad_sidecar_yaml_is_rejected_with_the_file(daemon_factory: Any) -> None:
    """A sidecar that is not valid YAML rejects its file with code bad-sidecar."""
    h = daemon_factory()
    h.start()
    (h.inbox / "meta.wav.nbank.yaml").write_text("id: [unclosed\n")
    h.drop("meta.wav", b"payload")
    h.wait_settled(1)
    h.stop()
    reason = reason_for(h, "meta.wav")
    assert reason["code"] == "bad-sidecar"
    assert Path(reason["rejected_path"]).read_bytes() == b"payload"


def test_sidecar_metadata_and_path_metadata_are_registered(daemon_factory: Any) -> None:
    """Inbox metadata, path_metadata groups and sidecar metadata merge into the record."""
    h = daemon_factory(
        inbox_options={
            "metadata": {"rig": "rig3", "experimenter": "dmeliza"},
            "path_metadata": "^(?P<bird>[^/]+)/",
        }
    )
    h.start()
    (h.inbox / "b12").mkdir(parents=True)
    (h.inbox / "b12" / "song.wav.nbank.json").write_text(json.dumps({"metadata": {"take": 2}}))
    h.drop("b12/song.wav", b"song bytes")
    h.wait_settled(1)
    h.stop()
    with h.open_registry() as reg:
        record = reg.get_resource("song")
    assert record is not None
    assert record.metadata == {"rig": "rig3", "bird": "b12", "take": 2, "experimenter": "dmeliza"}
    assert record.experimenter == "dmeliza"
    assert not (h.inbox / "b12" / "song.wav.nbank.json").exists()


def test_auto_id_assigns_eight_base36_characters(daemon_factory: Any) -> None:
    """With auto_id the resource gets an 8-character lowercase base-36 identifier."""
    h = daemon_factory(inbox_options={"auto_id": True})
    h.start()
    h.drop("anything goes here.wav", b"x" * 10)
    h.wait_settled(1)
    h.stop()
    [receipt] = h.receipts()
    assert len(receipt["id"]) == 8
    assert all(c in "0123456789abcdefghijklmnopqrstuvwxyz" for c in receipt["id"])
    assert stored_bytes(h, receipt["id"] + ".wav") == b"x" * 10


def test_symlink_is_rejected_and_its_target_untouched(daemon_factory: Any, tmp_path: Path) -> None:
    """A symlink is never followed: it moves to rejected/ as a link; the target stays."""
    h = daemon_factory()
    h.start()
    target = tmp_path / "outside.wav"
    target.write_bytes(b"secret outside bytes")
    os.symlink(target, h.inbox / "link.wav")
    h.wait_settled(1)
    h.stop()
    reason = reason_for(h, "link.wav")
    assert reason["code"] == "unsupported"
    assert os.path.islink(reason["rejected_path"])
    assert target.read_bytes() == b"secret outside bytes"
    assert h.receipts() == []


def test_hard_link_is_rejected_and_never_read(daemon_factory: Any, tmp_path: Path) -> None:
    """A file with another name elsewhere (nlink > 1) is rejected, not archived."""
    h = daemon_factory()
    h.start()
    elsewhere = tmp_path / "elsewhere.wav"
    elsewhere.write_bytes(b"shared inode")
    os.link(elsewhere, h.inbox / "hard.wav")
    h.wait_settled(1)
    h.stop()
    assert reason_for(h, "hard.wav")["code"] == "unsupported"
    assert elsewhere.read_bytes() == b"shared inode"
    assert h.archive_files() == {}


def test_fifo_and_socket_are_rejected_without_blocking(daemon_factory: Any) -> None:
    """FIFOs and sockets are moved by name, never opened (the daemon does not hang)."""
    h = daemon_factory()
    h.start()
    os.mkfifo(h.inbox / "pipe.wav")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(h.inbox / "sock.wav"))
    h.drop("after.wav", b"still works")
    h.wait_settled(3)
    h.stop()
    s.close()
    assert reason_for(h, "pipe.wav")["code"] == "unsupported"
    assert reason_for(h, "sock.wav")["code"] == "unsupported"
    assert stored_bytes(h, "after.wav") == b"still works"


def test_folder_when_directories_not_allowed_is_rejected(daemon_factory: Any) -> None:
    """With directories: resources but an archive that forbids them, folders are rejected."""
    h = daemon_factory(inbox_options={"directories": "resources"})
    h.start()
    folder = h.inbox / "session1"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.dat").write_bytes(b"a")
    h.wait_settled(1)
    h.stop()
    reason = reason_for(h, "session1")
    assert reason["code"] == "directory-not-allowed"
    assert (Path(reason["rejected_path"]) / "sub" / "a.dat").read_bytes() == b"a"


def test_marker_mode_waits_for_done_file_and_removes_it(daemon_factory: Any) -> None:
    """With ready: marker, a file is deposited only after NAME.done appears; the marker goes."""
    h = daemon_factory(inbox_options={"ready": "marker"})
    h.start()
    src = h.drop("late.wav", b"late bytes")
    nbankctl = str(Path(sys.executable).with_name("nbankctl"))

    def verdict() -> str:
        out = subprocess.run(
            [nbankctl, "-c", str(h.config_path), "--json", "explain", str(src)],
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout)["state"] if out.returncode == 0 else ""

    # settled, and held back only because the marker is missing
    wait_for(lambda: verdict() == "waiting-for-marker", 30, "the waiting-for-marker verdict")
    assert h.receipts() == []
    (h.inbox / "late.wav.done").write_bytes(b"")
    h.wait_settled(1)
    h.stop()
    assert [r["id"] for r in h.receipts()] == ["late"]
    assert stored_bytes(h, "late.wav") == b"late bytes"
    assert not (h.inbox / "late.wav.done").exists()


def test_sigterm_stops_the_daemon_with_stopping_notification(daemon_factory: Any) -> None:
    """SIGTERM makes nbankd send STOPPING=1 and exit 0."""
    h = daemon_factory()
    h.start()
    h.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    h.wait_message(lambda m: "STOPPING=1" in m, 10)
    assert h.wait_exit(10) == 0


def test_kill9_during_burst_loses_nothing_and_duplicates_nothing(harness: DaemonHarness) -> None:
    """After SIGKILL mid-burst and a restart, every input is exactly once archived or rejected."""
    harness.start()
    payloads = {f"burst{i:03d}.bin": os.urandom(3000 + i) for i in range(60)}
    payloads["burst_empty.bin"] = b""
    for name, data in payloads.items():
        harness.drop(name, data)
    wait_for(lambda: len(harness.receipts()) >= 10, 60, "some deposits before the kill")
    harness.kill9()
    harness.start()
    harness.wait_settled(len(payloads), timeout=120)
    harness.stop()
    receipts = harness.receipts()
    ids = [r["id"] for r in receipts]
    assert len(ids) == len(set(ids)), "a receipt was written twice"
    rejected = {r["original_name"] for r in harness.reasons()}
    assert rejected == {"burst_empty.bin"}
    files = harness.archive_files()
    with harness.open_registry() as reg:
        for name, data in payloads.items():
            if not data:
                continue
            assert files[name].read_bytes() == data
            record = reg.get_resource(Path(name).stem)
            assert record is not None and record.sha1 == sha1(data)
        records = list(reg.search(archive=harness.archive_name))
    assert len(records) == len(payloads) - 1
    leftovers = work_entries(harness.inbox / ".nbank")
    assert leftovers == []
    assert list((harness.archive / "staging").iterdir()) == []
    ours = (".nbank", "rejected", CANARY_NAME)
    assert [p.name for p in harness.inbox.iterdir() if p.name not in ours] == []


def test_nbank_archive_check_is_clean_after_deposits(daemon_factory: Any, request: Any) -> None:
    """The real ``nbank archive check`` finds nothing wrong in an archive nbankd filled,
    one-character identifiers included (filed where nbank looks: ``nbank locate``)."""
    server = request.getfixturevalue("django_registry")
    from nbankd.registry.http import HttpRegistry

    h = daemon_factory(registry=server.url, auth=(server.username, server.password))
    h.dtype = "dt" + h.archive_name
    with HttpRegistry(server.url, (server.username, server.password)) as reg:
        reg.add_datatype(h.dtype, "application/octet-stream")
    h.start()
    for i in range(3):
        h.drop(f"chk{i}.wav", os.urandom(100 + i))
    h.drop("k.wav", os.urandom(99))
    h.wait_settled(4)
    h.stop()
    nbank = str(Path(os.sys.executable).with_name("nbank"))
    env = {**os.environ, "NBANK_REGISTRY": server.url}
    located = subprocess.run(
        [nbank, "-r", server.url, "locate", "k"], capture_output=True, text=True, env=env
    )
    assert located.stdout.split() == ["k", str(h.archive / "resources" / "k" / "k.wav")], located
    out = subprocess.run(
        [nbank, "-r", server.url, "archive", "check", str(h.archive)],
        capture_output=True,
        text=True,
        env={**os.environ, "NBANK_REGISTRY": server.url},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert (
        "Resources in registry: 4; missing from archive: 0; missing from registry: 0; "
        "read/verify errors: 0; other layout errors: 0; permission errors: 0" in text
    ), text


def test_one_character_identifier_is_filed_as_neurobank_does(daemon_factory: Any) -> None:
    """``a.dat`` is deposited as ``a`` under the stub of its identifier (``a/``), where
    nbank's check and ``resource_path`` look."""
    h = daemon_factory()
    h.start()
    h.drop("a.dat", b"tiny name")
    h.wait_settled(1)
    h.stop()
    [receipt] = h.receipts()
    assert receipt["id"] == "a"
    assert (h.archive / "resources" / "a" / "a.dat").read_bytes() == b"tiny name"
