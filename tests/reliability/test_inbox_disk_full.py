"""An inbox whose filesystem is full: nbankd still starts and reloads (the token it
leaves in the work folder is not worth refusing to drain the inbox for)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, status_json, wait_for
from fixtures.daemon import nbankctl as ctl
from fixtures.mountns import MountNamespace
from nbankd.deposit.folderproof import PROOF_NAME, TEMP_NAME
from nbankd.names import WORK_DIR_NAME


def _fill(folder: Path) -> None:
    """Writes a file in ``folder`` until its filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def _on_full_tmpfs(daemon_factory: Any, ns: MountNamespace) -> tuple[DaemonHarness, Path]:
    """A daemon whose inbox is on a full 256 KiB tmpfs; (harness, the work folder as the
    test sees it)."""
    h: DaemonHarness = daemon_factory(wrap_argv=ns.enter, inbox_options={"watch": "poll"})
    mnt = h.root / "mnt"
    mnt.mkdir()
    ns.mount_tmpfs(mnt, "256k")
    h.inbox = mnt / "inbox"
    h.rejected = h.inbox / "rejected"
    ns.view(h.inbox).mkdir(mode=0o777)
    _fill(ns.view(mnt))
    h.write_config()
    return h, ns.view(h.inbox / WORK_DIR_NAME)


def test_daemon_starts_with_its_inbox_filesystem_full(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """No room for the work folder's token: the daemon starts, says so in its log, and
    leaves no half-written token that status would call someone's input."""
    h, work = _on_full_tmpfs(daemon_factory, mount_ns)
    h.start()
    assert not (work / PROOF_NAME).exists()
    assert not [n for n in os.listdir(work) if n.startswith(TEMP_NAME)]
    # logged during the start, by the log writer's thread: it may follow READY=1
    wait_for(
        lambda: "cannot leave the work folder's token" in h.log_path.read_text(errors="replace"),
        60,
        "the missing token logged",
    )
    _code, doc = status_json(h)
    assert doc["inboxes"][0]["unowned_work_files"] == []
    h.stop()


def test_reload_with_the_inbox_filesystem_full_completes(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """nbankctl reload on a full inbox filesystem finishes and answers done."""
    h, _work = _on_full_tmpfs(daemon_factory, mount_ns)
    h.start()
    out = ctl(h, "--json", "reload")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["done"] is True
    assert "Exception in thread" not in h.log_path.read_text(errors="replace")
    h.stop()
