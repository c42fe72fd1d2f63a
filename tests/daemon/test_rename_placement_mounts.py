"""Hostile review of other filesystems and file flags inside an inbox: a sub-folder of a
recursive inbox that is a mount point (a tmpfs, a bind mount of a folder elsewhere, the
inbox itself bound onto its own sub-folder), a mount inside a folder input, a mount
appearing between the scan and the claim, an inbox reached through a bind mount with
``placement: rename``, immutable and append-only files (``chattr +i`` / ``+a``) as
inputs or inside a folder input, and hard links.

Every mount is made in a private mount namespace (``fixtures.mountns``) the daemon runs
in: nothing is left mounted when a test fails. Every test not labelled "guard" fails
on the code it was written against and names the behaviour expected once fixed.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.daemon import NBANKD, DaemonHarness, more_scans, status_json, wait_for
from fixtures.mountns import MountNamespace, poll_daemon
from nbankd.archive.opening import create_archive
from nbankd.archive.probe import place_across, why_not_placed
from nbankd.deposit.lifecycle import FINAL
from nbankd.names import PROBE_PREFIX

FINAL_STATES = {str(s) for s in FINAL}


# --- placement: rename into the archive through a bind mount --------------------------


def test_rename_placement_through_a_bind_mount_never_registers_what_it_cannot_publish(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """An inbox with ``placement: rename`` reached through a bind mount of a folder on
    the archive's filesystem (same device number, another mount: link() and rename()
    into the archive fail with EXDEV) is refused at start naming placement, or its
    inputs are deposited; never registered and then left unpublishable for ever (a
    registry record without its file)."""
    h = poll_daemon(daemon_factory, mount_ns, placement="rename")
    real = h.root / "rig-inbox"  # on the archive's filesystem, as check-config verifies
    real.mkdir()
    h.inbox.mkdir()
    mount_ns.run("mount", "--bind", real, h.inbox)
    try:
        h.start()
    except AssertionError:
        log = h.log_path.read_text(errors="replace")
        assert "placement" in log, log[-2000:]
        return
    try:
        (real / "rec.dat").write_bytes(b"one recording\n" * 64)
        wait_for(
            lambda: h.receipts() or any(r["code"] for r in h.journal_rows()),
            30,
            "rec.dat to be deposited or to wait with an error",
        )
        with h.open_registry() as reg:
            record = reg.get_resource("rec")
        stored = h.archive / "resources" / "re" / "rec.dat"
        assert record is None or stored.exists(), (
            f"rec is registered but can never be published: "
            f"{[(r['state'], r['code'], r['error']) for r in h.journal_rows()]}"
        )
    finally:
        h.stop()


# --- placement: rename proved at start: focused tests beside the hostile one ----------


def _probe_files(*folders: Path) -> list[Path]:
    """The placement probe's files left in ``folders`` (none, whatever happened)."""
    return [
        p for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(PROBE_PREFIX)
    ]


def _bound_inbox(h: DaemonHarness, ns: MountNamespace) -> Path:
    """The inbox bound (in ``ns``) onto ``h.inbox`` from a folder on the archive's
    filesystem; returns that folder, where the test writes what the daemon sees."""
    real = h.root / "rig-inbox"
    real.mkdir()
    h.inbox.mkdir()
    ns.run("mount", "--bind", real, h.inbox)
    return real


def test_place_across_links_a_file_between_folders_of_one_mount_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """Two folders of one mount: proved (None), and neither keeps the probe's file."""
    (tmp_path / "work").mkdir()
    (tmp_path / "staging").mkdir()
    src = os.open(tmp_path / "work", os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(tmp_path / "staging", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert place_across(src, dst, f"{PROBE_PREFIX}placement-t") is None
    finally:
        os.close(src)
        os.close(dst)
    assert list((tmp_path / "work").iterdir()) == list((tmp_path / "staging").iterdir()) == []


def test_place_across_a_bind_mount_fails_with_exdev_and_leaves_nothing(
    tmp_path: Path, mount_ns: MountNamespace
) -> None:
    """A folder bound onto another place of the same filesystem has its device number,
    yet link() into the archive's folder fails: EXDEV, and no probe file stays."""
    real, bound, staging = tmp_path / "real", tmp_path / "bound", tmp_path / "staging"
    for folder in (real, bound, staging):
        folder.mkdir()
    mount_ns.run("mount", "--bind", real, bound)
    seen = mount_ns.view(bound)  # the bind mount, as the namespace sees it
    assert os.stat(seen).st_dev == os.stat(staging).st_dev
    src = os.open(seen, os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(mount_ns.view(staging), os.O_RDONLY | os.O_DIRECTORY)
    try:
        failed = place_across(src, dst, f"{PROBE_PREFIX}placement-t")
    finally:
        os.close(src)
        os.close(dst)
    assert failed is not None and failed.errno == errno.EXDEV
    assert "another mount" in why_not_placed(failed)
    assert _probe_files(real, staging) == []


def test_place_across_renames_where_there_are_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without hard links (link() says EPERM) publishing renames with RENAME_NOREPLACE:
    the probe does the same, proves it, and removes the file it moved."""
    (tmp_path / "work").mkdir()
    (tmp_path / "staging").mkdir()

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    src = os.open(tmp_path / "work", os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(tmp_path / "staging", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert place_across(src, dst, f"{PROBE_PREFIX}placement-t") is None
    finally:
        os.close(src)
        os.close(dst)
    assert _probe_files(tmp_path / "work", tmp_path / "staging") == []


def test_place_across_raises_other_errors_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that proves nothing either way (an I/O error) is raised; the file made
    is removed all the same."""
    (tmp_path / "work").mkdir()
    (tmp_path / "staging").mkdir()

    def failing(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", failing)
    src = os.open(tmp_path / "work", os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(tmp_path / "staging", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as raised:
            place_across(src, dst, f"{PROBE_PREFIX}placement-t")
    finally:
        os.close(src)
        os.close(dst)
    assert raised.value.errno == errno.EIO
    assert _probe_files(tmp_path / "work", tmp_path / "staging") == []


@pytest.mark.parametrize("archive_made", [True, False], ids=["archive-there", "archive-created"])
def test_the_daemon_refuses_to_start_naming_the_inbox_its_placement_and_what_to_do(
    daemon_factory: Any, mount_ns: MountNamespace, archive_made: bool
) -> None:
    """Started on a ``placement: rename`` inbox bound from the archive's filesystem,
    nbankd exits 2 naming the configuration key, the inbox, why and what to do, whether
    the archive was there (refused before anything else) or created by this start;
    nothing is claimed or registered and no probe file is left behind."""
    h = poll_daemon(daemon_factory, mount_ns, placement="rename")
    if archive_made:
        create_archive(h.archive, h.registry_address)
    real = _bound_inbox(h, mount_ns)
    (real / "rec.dat").write_bytes(b"one recording\n")
    with pytest.raises(AssertionError):
        h.start(timeout=20)
    assert h.proc is not None and h.proc.wait(timeout=30) == 2
    said = h.log_path.read_text(errors="replace")
    assert "inboxes[0]: placement: rename cannot work for inbox" in said, said[-2000:]
    assert str(h.inbox) in said and "EXDEV" in said, said[-2000:]
    assert "use placement: copy for this inbox" in said, said[-2000:]
    assert "on the archive's own mount" in said, said[-2000:]
    assert h.journal_rows() == []
    assert (real / "rec.dat").exists()
    assert _probe_files(real / ".nbank", h.archive / "staging") == []


def test_a_reload_to_rename_placement_through_a_bind_mount_keeps_the_running_setup(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """A reload that makes a bound inbox ``placement: rename`` fails naming why; the
    running configuration (copy) stays and deposits the inbox's inputs."""
    h = poll_daemon(daemon_factory, mount_ns)
    real = _bound_inbox(h, mount_ns)
    h.start()
    try:
        cfg = yaml.safe_load(h.config_path.read_text())
        cfg["inboxes"][0]["placement"] = "rename"
        h.config_path.write_text(yaml.safe_dump(cfg))
        h.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

        def refused() -> list[dict[str, Any]]:
            events = h.log_events()
            return [e for e in events if str(e.get("event", "")).startswith("reload failed")]

        [event] = wait_for(refused, 30, "the reload to be refused")
        assert "inboxes[0]: placement: rename cannot work" in event["error"], event
        (real / "rec.dat").write_bytes(b"one recording\n" * 64)
        wait_for(lambda: h.receipts(), 30, "rec.dat to be deposited by copy")
        [row] = h.journal_rows()
        assert row["state"] == "done", row
        assert (h.archive / "resources" / "re" / "rec.dat").exists()
        assert _probe_files(real / ".nbank", h.archive / "staging") == []
    finally:
        h.stop()


def _placement_problem(h: DaemonHarness) -> str:
    _code, doc = status_json(h)
    return str(doc["inboxes"][0].get("placement_problem") or "")


def test_an_archive_mounted_after_the_start_is_probed_before_anything_is_claimed(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """The archive not there at start (unmounted): nbankd starts, the bound rename inbox
    waits unproved; once the archive appears the probe fails, status says it cannot work,
    and its input is never claimed nor registered."""
    h = poll_daemon(daemon_factory, mount_ns, placement="rename")
    h.archive_options = {"create": False}
    real = _bound_inbox(h, mount_ns)
    h.start()
    try:
        (real / "rec.dat").write_bytes(b"one recording\n")
        assert "not proved yet" in _placement_problem(h)
        create_archive(h.archive, h.registry_address)
        wait_for(
            lambda: "cannot work" in _placement_problem(h), 30, "the probe to refuse the inbox"
        )
        more_scans(h, 2)
        code, doc = status_json(h)
        assert code == 1 and any("placement: rename cannot work" in d for d in doc["degraded"])
        assert h.journal_rows() == []
        with h.open_registry() as reg:
            assert reg.get_resource("rec") is None
        assert _probe_files(real / ".nbank", h.archive / "staging") == []
    finally:
        h.stop()


def test_an_archive_mounted_after_the_start_is_proved_and_deposits_resume(
    daemon_factory: Any,
) -> None:
    """guard: a rename inbox on the archive's own mount whose archive appears after the
    start waits (unproved, status degraded), then is proved and deposits in place."""
    h = poll_daemon(daemon_factory, placement="rename")
    h.archive_options = {"create": False}
    h.start()
    try:
        h.drop("rec.dat", b"one recording\n")
        assert "not proved yet" in _placement_problem(h)
        more_scans(h, 2)
        assert h.journal_rows() == []
        create_archive(h.archive, h.registry_address)
        wait_for(lambda: h.receipts(), 30, "rec.dat to be deposited")
        assert _placement_problem(h) == ""
        assert (h.archive / "resources" / "re" / "rec.dat").read_bytes() == b"one recording\n"
    finally:
        h.stop()


def _check_config(h: DaemonHarness, ns: MountNamespace | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}
    argv = [NBANKD, "check-config", "--offline", "-c", str(h.config_path)]
    return subprocess.run(
        [*(ns.enter if ns is not None else []), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_check_config_reports_a_rename_inbox_on_a_bind_mount(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """check-config, where it can write the work folder, links a file of it into the
    archive as the daemon does: an error naming the key, EXDEV and what to do."""
    h = poll_daemon(daemon_factory, mount_ns, placement="rename")
    create_archive(h.archive, h.registry_address)
    real = _bound_inbox(h, mount_ns)
    (real / ".nbank").mkdir(mode=0o700)
    h.write_config()
    proc = _check_config(h, mount_ns)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "inboxes[0].placement" in proc.stderr, proc.stderr
    assert "EXDEV" in proc.stderr and "use placement: copy" in proc.stderr, proc.stderr
    assert _probe_files(real / ".nbank", h.archive / "staging") == []


def test_check_config_proves_a_rename_inbox_on_the_archives_mount(daemon_factory: Any) -> None:
    """guard: the same inbox on the archive's own mount passes check-config, which
    leaves no probe file; without a work folder yet it only warns (nothing proved)."""
    h = poll_daemon(daemon_factory, placement="rename")
    create_archive(h.archive, h.registry_address)
    h.inbox.mkdir()
    h.write_config()
    proc = _check_config(h, None)
    assert proc.returncode == 0, proc.stderr
    assert "could not be proved" in proc.stderr and "nbankd proves it at start" in proc.stderr
    (h.inbox / ".nbank").mkdir(mode=0o700)
    proc = _check_config(h, None)
    assert proc.returncode == 0 and "placement" not in proc.stderr, proc.stderr
    assert _probe_files(h.inbox / ".nbank", h.archive / "staging") == []


def test_check_config_as_another_user_warns_it_could_not_prove_rename(
    daemon_factory: Any, user_tmp_path: Path, unpriv_user: Any
) -> None:
    """check-config run as a user who may not write nbankd's work folder warns that
    placement: rename was not proved (nbankd proves it at start); exit 0."""
    archive, inbox = user_tmp_path / "archive", user_tmp_path / "inbox"
    create_archive(archive, "https://host/neurobank/")
    (inbox / ".nbank").mkdir(parents=True, mode=0o700)  # root's, as nbankd's user's would be
    config = user_tmp_path / "nbankd.yaml"
    config.write_text(
        "registry: https://host/neurobank/\nstate_dir: state\ncontrol_socket: control.sock\n"
        f"archives:\n  - path: {archive}\n"
        f"inboxes:\n  - path: {inbox}\n    dtype: wav\n    placement: rename\n"
    )
    config.chmod(0o644)
    proc = unpriv_user.run([NBANKD, "check-config", "--offline", "-c", str(config)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "inboxes[0].placement" in proc.stderr, proc.stderr
    assert "could not be proved" in proc.stderr, proc.stderr
