"""The control socket itself: protocol, authorization by peer credentials, socket file.

Every test talks to a real ``nbankd`` process over its real Unix socket, either
with raw protocol lines or with ``nbankctl`` run as a subprocess (as root, or as
an unprivileged user through ``setpriv``).
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.daemon import NBANKD, DaemonHarness, raw_request, wait_for
from fixtures.users import TestUser

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))


def status_ok(path: Path) -> bool:
    reply = raw_request(path, b'{"v": 1, "cmd": "status", "args": {}}\n')
    return bool(reply["ok"])


@pytest.fixture
def h(daemon_factory: Any) -> DaemonHarness:
    harness: DaemonHarness = daemon_factory()
    harness.start()
    return harness


def test_status_reply_follows_the_protocol(h: DaemonHarness) -> None:
    """A status request gets {"v": 1, "ok": true, "result": {...}} on one line."""
    reply = raw_request(h.socket_path, b'{"v": 1, "cmd": "status", "args": {}}\n')
    assert reply["v"] == 1 and reply["ok"] is True
    assert reply["result"]["pid"] == h.proc.pid  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json\n", "bad-request"),
        (b"[1, 2]\n", "bad-request"),
        (b'{"v": 2, "cmd": "status"}\n', "unsupported-version"),
        (b'{"v": 1, "cmd": "format-disk"}\n', "unknown-command"),
        (b'{"v": 1, "cmd": "explain", "args": {"path": 5}}\n', "usage"),
        (b'{"v": 1, "cmd": "status", "args": "x' + b"y" * 70_000 + b'"}\n', "too-large"),
    ],
)
def test_bad_request_gets_an_error_and_the_server_lives_on(
    h: DaemonHarness, line: bytes, code: str
) -> None:
    """A malformed request is answered with its error code and never stops the server."""
    reply = raw_request(h.socket_path, line)
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert status_ok(h.socket_path)


def test_error_replies_carry_their_exit_status(h: DaemonHarness) -> None:
    """An error reply says which exit status nbankctl gives it: 2 for a request's
    fault, as decided where the error was raised, and the client uses it as sent."""
    from nbankd.control.client import ControlError, call

    reply = raw_request(h.socket_path, b'{"v": 1, "cmd": "no-such-command", "args": {}}\n')
    assert reply["error"]["code"] == "unknown-command" and reply["error"]["exit"] == 2
    reply = raw_request(h.socket_path, b'{"v": 1, "cmd": "explain", "args": {"path": 5}}\n')
    assert reply["ok"] is False and reply["error"]["exit"] == 2
    with pytest.raises(ControlError) as caught:
        call(h.socket_path, "explain", {"path": 5})
    assert caught.value.exit_code == reply["error"]["exit"]


def test_client_that_sends_nothing_does_not_block_others(h: DaemonHarness) -> None:
    """A silent connection held open does not stop other clients from being served."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(h.socket_path))
        assert status_ok(h.socket_path)


def test_socket_file_is_group_only(h: DaemonHarness) -> None:
    """The socket is mode 0660: only its owner and group can connect."""
    st = os.lstat(h.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_socket_file_is_removed_at_shutdown(h: DaemonHarness) -> None:
    """A clean stop removes the socket file."""
    assert h.socket_path.exists()
    assert h.stop() == 0
    assert not os.path.lexists(h.socket_path)


def test_stale_socket_file_is_replaced_at_start(daemon_factory: Any) -> None:
    """A socket file left by a crash (nothing listening) is replaced, and start-up succeeds."""
    h = daemon_factory()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(h.socket_path))  # closed without unlinking: a stale file
    h.start()
    assert status_ok(h.socket_path)


def test_second_daemon_on_the_same_socket_refuses_to_start(h: DaemonHarness) -> None:
    """Another nbankd (own state_dir) configured with a live daemon's socket exits 2
    naming the socket."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
    cfg = yaml.safe_load(h.config_path.read_text())
    cfg["state_dir"] = str(h.root / "state-of-the-second")
    second = h.root / "second.yaml"
    second.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [NBANKD, "-c", str(second)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2
    assert f"already running on control socket {h.socket_path}" in proc.stderr
    assert status_ok(h.socket_path)  # the first daemon's socket is untouched


def test_kill9_leaves_a_socket_the_next_start_replaces(h: DaemonHarness) -> None:
    """After kill -9 the socket file stays behind; restarting replaces it and answers."""
    h.kill9()
    assert os.path.lexists(h.socket_path)
    h.messages.clear()  # else start() takes the first run's READY=1 for this one's
    h.start()
    assert status_ok(h.socket_path)


# --- authorization by peer credentials -----------------------------------------------


@pytest.fixture
def lab_daemon(daemon_factory: Any, user_tmp_path: Path, lab_group: str) -> DaemonHarness:
    """A daemon whose readers are the lab group; its socket sits in a folder users can reach."""
    h: DaemonHarness = daemon_factory(extra_config={"control": {"readers": [lab_group]}})
    h.socket_path = user_tmp_path / "control.sock"
    h.start()
    return h


def as_user(user: TestUser, h: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return user.run([NBANKCTL, *args, "--socket", str(h.socket_path)], timeout=60)


def test_socket_belongs_to_the_one_configured_group(
    lab_daemon: DaemonHarness, lab_group: str
) -> None:
    """With exactly one group among readers and admins, the socket is given to that group."""
    assert os.lstat(lab_daemon.socket_path).st_gid == grp.getgrnam(lab_group).gr_gid


def test_reader_may_run_status(lab_daemon: DaemonHarness, unpriv_user: TestUser) -> None:
    """A member of a readers group runs read-only commands."""
    proc = as_user(unpriv_user, lab_daemon, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["inboxes"][0]["path"] == str(lab_daemon.inbox)


def test_reader_is_denied_requeue_and_the_daemon_logs_it(
    lab_daemon: DaemonHarness, unpriv_user: TestUser
) -> None:
    """A reader asking for a state-changing command gets exit 2; the daemon logs who asked."""
    proc = as_user(unpriv_user, lab_daemon, "requeue", "--all-rejected")
    assert proc.returncode == 2
    assert f"user {unpriv_user.name} may not run 'requeue' (admins: root)" in proc.stderr

    def denial() -> dict[str, Any] | None:
        events = lab_daemon.log_events()
        return next((e for e in events if e.get("event") == "control request denied"), None)

    entry = wait_for(denial, what="the denial in the daemon's log")
    assert entry["user"] == unpriv_user.name and entry["uid"] == unpriv_user.uid
    assert entry["command"] == "requeue" and entry["level"] == "warning"


def test_reader_is_denied_pause(lab_daemon: DaemonHarness, unpriv_user: TestUser) -> None:
    """pause needs an admin: the inbox stays unpaused after a reader's attempt."""
    assert as_user(unpriv_user, lab_daemon, "pause").returncode == 2
    reply = raw_request(lab_daemon.socket_path, b'{"v": 1, "cmd": "status"}\n')
    assert reply["result"]["inboxes"][0]["paused"] is False


def test_user_outside_the_group_cannot_connect(
    lab_daemon: DaemonHarness, other_user: TestUser
) -> None:
    """A user in neither list nor the socket's group is stopped by the file permissions."""
    proc = as_user(other_user, lab_daemon, "status")
    assert proc.returncode == 2
    assert "permission denied" in proc.stderr


@pytest.mark.parametrize(
    ("code", "status"),
    [("denied", 2), ("usage", 2), ("not-found", 2), ("busy", 3), ("conflict", 1), ("internal", 1)],
)
def test_errors_of_an_older_daemon_keep_their_exit_status(code: str, status: int) -> None:
    """A reply without ``exit`` (a daemon of the previous release, still running after
    nbankctl was upgraded) gets the exit status that release gave its code."""
    from nbankd.control import protocol

    line = json.dumps({"v": 1, "ok": False, "error": {"code": code, "message": "m"}}).encode()
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode_reply(line)
    assert caught.value.exit_code == status
