"""Hostile review of the control socket: who may do what over it, and requests meant
to hang it or to make the daemon act with more rights than the peer has.

Every test talks to a real ``nbankd`` over its real Unix socket; a peer that is not
root runs as an unprivileged test user (``setpriv``), so the kernel's peer
credentials are the ones the server checks.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from fixtures.daemon import DaemonHarness, raw_request
from fixtures.users import TestUser

# --- helpers -------------------------------------------------------------------------


def request(path: Path, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    line = json.dumps({"v": 1, "cmd": cmd, "args": args or {}}).encode() + b"\n"
    return raw_request(path, line)


_AS_USER = """
import json, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.settimeout(120)
    s.connect(sys.argv[1])
    s.sendall(sys.argv[2].encode() + b"\\n")
    data = b""
    while not data.endswith(b"\\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
sys.stdout.write(data.decode())
"""


def request_as(user: TestUser, path: Path, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """One request sent by a process of ``user`` (its peer credentials are that user's)."""
    line = json.dumps({"v": 1, "cmd": cmd, "args": args})
    proc = user.python(_AS_USER, str(path), line, timeout=150)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.fixture
def admin_daemon(
    daemon_factory: Any, user_tmp_path: Path, unpriv_user: TestUser
) -> Iterator[DaemonHarness]:
    """A daemon (run as root, as the harness does) whose configured admin is the
    unprivileged user ``nbanktest``: a lab manager allowed to deposit, pause and so on,
    who is neither root nor the daemon's user."""
    h: DaemonHarness = daemon_factory(extra_config={"control": {"admins": [unpriv_user.name]}})
    h.socket_path = user_tmp_path / "control.sock"
    yield h


# --- privilege: the daemon acting with rights the admin does not have -----------------


def test_deposit_handover_refuses_a_file_the_admin_cannot_read(
    admin_daemon: DaemonHarness, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """A file handed over by an admin who may not read it is refused and stays where it
    is (as tape-import refuses such a tar), never moved into the archive for them."""
    h = admin_daemon
    h.start()
    victim_dir = h.socket_path.parent / "victim"  # another user's folder, listable
    victim_dir.mkdir()
    os.chown(victim_dir, other_user.uid, other_user.gid)
    victim_dir.chmod(0o755)
    secret = victim_dir / "diary.bin"
    secret.write_bytes(b"private bytes of another user\n")
    os.chown(secret, other_user.uid, other_user.gid)
    secret.chmod(0o600)
    assert unpriv_user.run(["cat", str(secret)]).returncode != 0  # truly unreadable to them

    reply = request_as(
        unpriv_user,
        h.socket_path,
        "deposit",
        {"archive": str(h.archive), "files": [str(secret)], "dtype": h.dtype},
    )
    assert reply["ok"], reply
    items = reply["result"]["items"]
    done: Any = None
    if items:  # let the daemon finish what it accepted, to show what it did
        done = request(h.socket_path, "deposit-status", {"items": items, "wait": 30})
    assert items == [], (
        f"the daemon took another user's file for {unpriv_user.name}: {reply}; "
        f"then: {done}; archive now holds {sorted(h.archive_files())}"
    )
    assert secret.read_bytes() == b"private bytes of another user\n"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 403 to everything and remembers each Authorization header it saw."""

    seen: ClassVar[list[str]] = []

    def _any(self) -> None:
        auth = self.headers.get("Authorization")
        if auth:
            type(self).seen.append(auth)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b'{"detail": "nope"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_HEAD = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stranger_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server someone other than the lab runs: (its URL, the auth headers it got)."""

    class Recorder(_Recorder):
        seen: ClassVar[list[str]] = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/neurobank/", Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


def _passwords(headers: list[str]) -> list[str]:
    out = []
    for h in headers:
        if h.lower().startswith("basic "):
            out.append(base64.b64decode(h.split(None, 1)[1]).decode(errors="replace"))
    return out


def test_check_registry_never_sends_the_daemons_password_to_a_url_an_admin_names(
    admin_daemon: DaemonHarness,
    unpriv_user: TestUser,
    stranger_server: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    """check-registry from an admin who is not the daemon's user does not hand the
    daemon's registry password to whatever server the request names."""
    h = admin_daemon
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "registry").write_text("nbankd-rig:daemon-secret-pw\n")
    (creds / "registry").chmod(0o600)
    h.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    url, seen = stranger_server

    reply = request_as(unpriv_user, h.socket_path, "check-registry", {"url": url})
    leaked = [p for p in _passwords(seen) if "daemon-secret-pw" in p]
    assert not leaked, f"the daemon sent its registry password to {url}: {reply}"


def test_check_registry_never_reads_a_file_the_admin_cannot_read(
    admin_daemon: DaemonHarness,
    unpriv_user: TestUser,
    other_user: TestUser,
    stranger_server: tuple[str, list[str]],
) -> None:
    """check-registry's registry_auth names a file the daemon reads only when the admin
    who asked could read it: another user's private credentials never leave."""
    h = admin_daemon
    h.start()
    url, seen = stranger_server
    private = h.socket_path.parent / "other-home"
    private.mkdir()
    os.chown(private, other_user.uid, other_user.gid)
    private.chmod(0o700)
    theirs = private / "auth"
    theirs.write_text("nbanktest2:their-own-password\n")
    os.chown(theirs, other_user.uid, other_user.gid)
    theirs.chmod(0o600)

    reply = request_as(
        unpriv_user, h.socket_path, "check-registry", {"url": url, "registry_auth": str(theirs)}
    )
    leaked = [p for p in _passwords(seen) if "their-own-password" in p]
    assert not leaked, f"the daemon read {theirs} for {unpriv_user.name} and sent it: {reply}"


# --- pauses --------------------------------------------------------------------------


def test_pause_survives_a_reload_that_drops_and_restores_the_inbox(
    daemon_factory: Any,
) -> None:
    """An inbox paused, then left out of the configuration by one reload and put back
    by the next, is still paused: a pause lasts until resume (README), and the daemon's
    memory agrees with paused.json."""
    h: DaemonHarness = daemon_factory()
    second = h.root / "inbox2"
    h.write_config()
    cfg = yaml.safe_load(h.config_path.read_text())
    first_inbox = cfg["inboxes"][0]
    both = [first_inbox, {**first_inbox, "path": str(second)}]
    cfg["inboxes"] = both
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.start()

    reply = request(h.socket_path, "pause", {"inbox": str(h.inbox)})
    assert reply["ok"] and reply["result"]["changed"] == [str(h.inbox)], reply

    cfg["inboxes"] = [both[1]]  # the rig's inbox taken out for a while
    h.config_path.write_text(yaml.safe_dump(cfg))
    assert request(h.socket_path, "reload")["result"]["done"] is True
    cfg["inboxes"] = both  # and put back; nobody ran resume
    h.config_path.write_text(yaml.safe_dump(cfg))
    assert request(h.socket_path, "reload")["result"]["done"] is True

    on_disk = json.loads((h.state_dir / "paused.json").read_text())["paused"]
    status = request(h.socket_path, "status")["result"]
    paused = {e["path"]: e["paused"] for e in status["inboxes"]}
    assert str(h.inbox) in on_disk  # what a restart would do
    assert paused[str(h.inbox)] is True, f"resumed without resume: {paused}, file {on_disk}"


# --- requests that hang a connection ---------------------------------------------------


def test_job_status_with_a_nan_wait_answers_within_its_bound(admin_daemon: DaemonHarness) -> None:
    """A request whose ``wait`` is NaN (Python's json reads it) is answered within
    STATUS_WAIT, never held forever in a loop spinning a CPU."""
    from nbankd.control.job_handlers import STATUS_WAIT

    h = admin_daemon
    h.start()
    # a copy job still collecting identifiers ("more"): it has no events yet
    started = request(
        h.socket_path, "copy", {"archive": str(h.archive), "ids": ["x"], "more": True}
    )
    assert started["ok"], started
    job = started["result"]["job"]
    line = b'{"v": 1, "cmd": "job-status", "args": {"job": "%s", "wait": NaN}}\n' % job.encode()
    began = time.monotonic()
    try:
        reply = raw_request(h.socket_path, line, timeout=STATUS_WAIT + 10)
    except TimeoutError:
        pytest.fail(f"job-status with wait NaN got no answer in {STATUS_WAIT + 10:g} s")
    assert time.monotonic() - began <= STATUS_WAIT + 10
    assert reply["v"] == 1, reply


def test_deposit_status_with_a_nan_wait_answers_within_its_bound(
    admin_daemon: DaemonHarness, tmp_path: Path
) -> None:
    """deposit-status with ``wait`` NaN is answered within STATUS_WAIT even while its
    item is unfinished, not polled for ever."""
    from nbankd.control.deposit_handlers import STATUS_WAIT

    h = admin_daemon
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(tmp_path / "go")})
    rig = tmp_path / "rig"
    rig.mkdir()
    (rig / "held.bin").write_bytes(b"held bytes\n")
    reply = request(
        h.socket_path,
        "deposit",
        {"archive": str(h.archive), "files": [str(rig / "held.bin")], "dtype": h.dtype},
    )
    assert reply["ok"] and reply["result"]["items"], reply
    items = reply["result"]["items"]
    line = json.dumps({"v": 1, "cmd": "deposit-status", "args": {"items": items}})
    line = line[:-2] + ', "wait": NaN}}\n'
    try:
        answer = raw_request(h.socket_path, line.encode(), timeout=STATUS_WAIT + 10)
    except TimeoutError:
        pytest.fail(f"deposit-status with wait NaN got no answer in {STATUS_WAIT + 10:g} s")
    finally:
        (tmp_path / "go").touch()
    assert answer["v"] == 1, answer


# --- odd names ---------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["history", "pause", "rescan"])
def test_an_inbox_name_with_a_nul_byte_is_a_usage_error_not_a_daemon_bug(
    admin_daemon: DaemonHarness, cmd: str
) -> None:
    """An inbox named with a NUL byte is answered not-found or usage (exit 2), not
    'internal' (a bug in the daemon, exit 1, a traceback in its log per request)."""
    h = admin_daemon
    h.start()
    reply = request(h.socket_path, cmd, {"inbox": "in\x00box"})
    assert reply["ok"] is False
    assert reply["error"]["code"] in ("not-found", "usage"), reply


# --- a reader flooding the socket ------------------------------------------------------


_FLOOD = """
import os, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
for _ in range(3):  # four processes
    if os.fork() == 0:
        break
end = time.monotonic() + seconds
held, first = [], True
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        continue
    if first:
        print("flooding", flush=True)
        first = False
    held.append(s)
    if len(held) > 200:
        for h in held:
            h.close()
        held = []
"""


def test_reader_flooding_connections_cannot_lock_the_admin_out(
    daemon_factory: Any, user_tmp_path: Path, unpriv_user: TestUser, lab_group: str
) -> None:
    """While a reader opens connections as fast as it can, every nbankctl call of an
    admin still gets through (SPEC 9: a hostile client cannot lock administrators out);
    today the listen backlog fills and the client gives up at once with EAGAIN, exit 3."""
    import subprocess

    from nbankd.control.client import ControlClient

    h: DaemonHarness = daemon_factory(extra_config={"control": {"readers": [lab_group]}})
    h.socket_path = user_tmp_path / "control.sock"
    h.start()
    flood = subprocess.Popen(
        unpriv_user.argv([sys.executable, "-c", _FLOOD, str(h.socket_path), "6"]),
        env=unpriv_user.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes = []
    try:
        assert flood.stdout is not None and flood.stdout.readline().strip() == "flooding"
        for _ in range(10):
            try:
                ControlClient(h.socket_path, timeout=10).call("status")
                outcomes.append("ok")
            except Exception as err:  # what the admin sees
                outcomes.append(f"{type(err).__name__}: {err}")
    finally:
        flood.kill()
        flood.wait()
    failed = [o for o in outcomes if o != "ok"]
    assert not failed, f"{len(failed)}/10 admin calls failed during the flood: {failed[0]}"


# --- what the fixes must keep working, and their edges ---------------------------------


def _owned(path: Path, user: TestUser, mode: int) -> Path:
    """``path`` (a new folder where missing) given to ``user`` with ``mode``."""
    if not path.exists():
        path.mkdir()
    os.chown(path, user.uid, user.gid)
    path.chmod(mode)
    return path


def _acl_denying(path: Path, uid: int) -> None:
    """Gives ``path`` (mode 0644) a POSIX ACL entry that denies user ``uid`` everything
    (what ``setfacl -m u:NAME:---`` writes), its other entries as the mode says."""
    import struct

    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 0, uid), (0x04, 4, 0xFFFFFFFF)]
    entries += [(0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)]
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_access", raw)


def test_deposit_handover_takes_the_admins_own_file(
    admin_daemon: DaemonHarness, unpriv_user: TestUser
) -> None:
    """The check refuses only what the admin could not do: their own file, in their own
    folder, is deposited as before."""
    h = admin_daemon
    h.start()
    mine = _owned(h.socket_path.parent / "mine", unpriv_user, 0o755)
    rec = mine / "rec.bin"
    rec.write_bytes(b"the admin's own recording\n")
    _owned(rec, unpriv_user, 0o644)
    reply = request_as(
        unpriv_user,
        h.socket_path,
        "deposit",
        {"archive": str(h.archive), "files": [str(rec)], "dtype": h.dtype},
    )
    assert reply["ok"] and reply["result"]["refused"] == [], reply
    done = request(h.socket_path, "deposit-status", {"items": reply["result"]["items"], "wait": 30})
    assert done["result"]["done"], done
    assert [d["state"] for d in done["result"]["items"]] == ["done"], done
    assert "rec.bin" in h.archive_files()


@pytest.mark.parametrize("case", ["folder-not-writable", "acl-denies", "inside-a-folder"])
def test_deposit_handover_refuses_what_the_admin_could_not_take_naming_it(
    admin_daemon: DaemonHarness, unpriv_user: TestUser, other_user: TestUser, case: str
) -> None:
    """Readable but in a folder the admin may not write (the hand-over moves it out), a
    file an ACL keeps from the admin, a folder holding a file the admin may not read:
    each is refused naming the file and why, and left where it is."""
    h = admin_daemon
    h.start()
    theirs = _owned(h.socket_path.parent / "theirs", other_user, 0o755)
    handed = theirs / "rec.bin"
    handed.write_bytes(b"bytes\n")
    _owned(handed, other_user, 0o644)
    args: dict[str, Any] = {"archive": str(h.archive), "dtype": h.dtype}
    if case == "folder-not-writable":
        why = f"'{unpriv_user.name}' may not move files out of the folder {theirs}"
    elif case == "acl-denies":
        theirs.chmod(0o777)
        _acl_denying(handed, unpriv_user.uid)
        assert unpriv_user.run(["cat", str(handed)]).returncode != 0
        why = f"'{unpriv_user.name}' may not read {handed}"
    else:
        mine = _owned(h.socket_path.parent / "mine", unpriv_user, 0o755)
        handed = _owned(mine / "session", unpriv_user, 0o755)
        (handed / "ok.bin").write_bytes(b"readable\n")
        _owned(handed / "ok.bin", unpriv_user, 0o644)
        _owned(handed / "sub", other_user, 0o755)
        secret = handed / "sub" / "secret.bin"
        secret.write_bytes(b"not theirs\n")
        _owned(secret, other_user, 0o600)
        args["zip_directories"] = True
        why = f"'{unpriv_user.name}' may not read {secret}"
    before = sorted(p.name for p in handed.parent.iterdir())
    reply = request_as(unpriv_user, h.socket_path, "deposit", {**args, "files": [str(handed)]})
    assert reply["ok"] and reply["result"]["items"] == [], reply
    [refusal] = reply["result"]["refused"]
    assert refusal["source"] == str(handed)
    assert f"nbankd will not take {handed} for '{unpriv_user.name}'" in refusal["error"]
    assert why in refusal["error"], refusal
    assert sorted(p.name for p in handed.parent.iterdir()) == before  # nothing claimed


def test_deposit_handover_takes_nothing_swapped_in_after_the_admins_check(
    admin_daemon: DaemonHarness, unpriv_user: TestUser, other_user: TestUser, tmp_path: Path
) -> None:
    """A folder on the handed path swapped for a link to another user's folder after the
    admin's rights were checked (the admin owns the folder holding the link): the file
    now under that name is refused and stays where it is, never claimed for them."""
    h = admin_daemon
    go = tmp_path / "go"
    h.start(env={"NBANKD_PAUSE_AT": "handover-checked", "NBANKD_PAUSE_UNTIL": str(go)})
    base = _owned(h.socket_path.parent / "base", unpriv_user, 0o755)  # the admin's
    mine = _owned(base / "mine", unpriv_user, 0o755)
    (mine / "rec.bin").write_bytes(b"the admin's own recording\n")
    _owned(mine / "rec.bin", unpriv_user, 0o644)
    theirs = _owned(h.socket_path.parent / "theirs", other_user, 0o755)
    secret = theirs / "rec.bin"
    secret.write_bytes(b"another user's recording\n")
    _owned(secret, other_user, 0o600)
    (base / "now").symlink_to(mine)
    os.lchown(base / "now", unpriv_user.uid, unpriv_user.gid)
    handed = base / "now" / "rec.bin"
    replies: list[dict[str, Any]] = []
    args = {"archive": str(h.archive), "files": [str(handed)], "dtype": h.dtype}
    asking = threading.Thread(
        target=lambda: replies.append(request_as(unpriv_user, h.socket_path, "deposit", args))
    )
    asking.start()
    try:
        reached = Path(f"{go}.reached")
        deadline = time.monotonic() + 60
        while not reached.exists() and asking.is_alive() and time.monotonic() < deadline:
            asking.join(0.05)  # the daemon holds the request at the seam until go exists
        assert reached.exists(), replies
        # what the admin can do in their own folder: the link now leads to the victim's
        (base / "swap").symlink_to(theirs)
        os.rename(base / "swap", base / "now")
    finally:
        go.touch()
        asking.join(120)
    [reply] = replies
    assert reply["ok"], reply
    items = reply["result"]["items"]
    if items:  # let the daemon finish what it accepted, to show what it did
        request(h.socket_path, "deposit-status", {"items": items, "wait": 30})
    assert items == [], f"claimed for the admin after the swap: {reply}"
    [refusal] = reply["result"]["refused"]
    assert "is no longer the entry nbankd checked" in refusal["error"], refusal
    assert secret.read_bytes() == b"another user's recording\n"
    assert "rec.bin" not in h.archive_files()


def test_check_registry_from_an_admin_is_refused_naming_who_may(
    admin_daemon: DaemonHarness, unpriv_user: TestUser, stranger_server: tuple[str, list[str]]
) -> None:
    """An admin who is neither root nor the daemon's user is told that only those may
    run check-registry (exit 2), and nothing is sent anywhere."""
    h = admin_daemon
    h.start()
    url, seen = stranger_server
    reply = request_as(unpriv_user, h.socket_path, "check-registry", {"url": url})
    assert reply["ok"] is False and reply["error"]["code"] == "denied", reply
    assert reply["error"]["exit"] == 2
    assert "only root or nbankd's user" in reply["error"]["message"]
    assert seen == []


def test_a_pause_recorded_for_an_inbox_left_out_survives_other_pauses(
    daemon_factory: Any,
) -> None:
    """Pausing another inbox while a paused one is out of the configuration keeps the
    latter's record in paused.json, so it still comes back paused."""
    h: DaemonHarness = daemon_factory()
    second = h.root / "inbox2"
    h.write_config()
    cfg = yaml.safe_load(h.config_path.read_text())
    both = [cfg["inboxes"][0], {**cfg["inboxes"][0], "path": str(second)}]
    cfg["inboxes"] = both
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.start()
    assert request(h.socket_path, "pause", {"inbox": str(h.inbox)})["ok"]
    cfg["inboxes"] = [both[1]]
    h.config_path.write_text(yaml.safe_dump(cfg))
    assert request(h.socket_path, "reload")["result"]["done"] is True
    assert request(h.socket_path, "pause", {"inbox": str(second)})["ok"]
    assert request(h.socket_path, "resume", {"inbox": str(second)})["ok"]
    on_disk = json.loads((h.state_dir / "paused.json").read_text())["paused"]
    assert on_disk == [str(h.inbox)]
    cfg["inboxes"] = both
    h.config_path.write_text(yaml.safe_dump(cfg))
    assert request(h.socket_path, "reload")["result"]["done"] is True
    paused = {e["path"]: e["paused"] for e in request(h.socket_path, "status")["result"]["inboxes"]}
    assert paused == {str(h.inbox): True, str(second): False}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_that_is_not_finite_is_a_bad_request(number: str) -> None:
    """NaN, infinities and numbers too large for a float are refused when the request
    is read, whatever the command: JSON has no such numbers."""
    from nbankd.control.protocol import ProtocolError, decode_request

    line = b'{"v": 1, "cmd": "job-status", "args": {"job": "x", "wait": %s}}' % number.encode()
    with pytest.raises(ProtocolError) as refused:
        decode_request(line)
    assert refused.value.code == "bad-request"
    assert number in refused.value.message and "finite" in refused.value.message


def test_waits_are_clamped_and_checked() -> None:
    """A wait is clamped to the command's ceiling (a huge integer too, without
    overflowing a float); NaN given in-process is a usage error."""
    from nbankd.control.protocol import ProtocolError, wait_arg

    assert wait_arg({"wait": 10**400}, "wait", 30.0) == 30.0
    assert wait_arg({"wait": -5}, "wait", 30.0) == 0.0
    assert wait_arg({}, "wait", 30.0) == 0.0
    for bad in (float("nan"), float("inf"), True, "5"):
        with pytest.raises(ProtocolError) as refused:
            wait_arg({"wait": bad}, "wait", 30.0)
        assert refused.value.code == "usage"


@pytest.mark.parametrize(
    ("cmd", "args"),
    [
        ("explain", {"path": "/tmp/in\x00box/f"}),
        ("deposit", {"archive": "/a", "files": ["/tmp/a\x00b"]}),
        ("copy", {"archive": "/a", "ids": ["a\x00b"]}),
    ],
)
def test_a_nul_byte_in_a_path_or_name_is_a_usage_error(
    admin_daemon: DaemonHarness, cmd: str, args: dict[str, Any]
) -> None:
    h = admin_daemon
    h.start()
    if "archive" in args:
        args = {**args, "archive": str(h.archive)}
    reply = request(h.socket_path, cmd, args)
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "NUL byte" in reply["error"]["message"]


def test_the_client_retries_a_full_listen_queue_until_its_timeout(tmp_path: Path) -> None:
    """EAGAIN (the listen queue full) is retried, and once the timeout has passed the
    client gives up with exit 3 naming the busy socket, not at the first attempt."""
    from nbankd import errors
    from nbankd.control.client import ControlClient

    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(0)  # one connection queued at most; nobody accepts
        queued = []
        for _ in range(4):  # fill the queue (the kernel's count is off by one)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        else:
            pytest.fail("the listen queue never filled")
        began = time.monotonic()
        with pytest.raises(errors.DaemonUnreachable) as gave_up:
            ControlClient(path, timeout=0.5).call("status")
        took = time.monotonic() - began
        for s in queued:
            s.close()
    assert took >= 0.5
    assert "stayed busy for 0.5 s" in gave_up.value.message
    assert gave_up.value.exit_code == 3


def test_a_hanging_name_lookup_holds_only_the_connections_of_its_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """User names are looked up off the accept thread: while one user's lookup hangs
    (a directory service down), queuing its connections returns at once, and another
    user's connection is answered; the first ones are once the lookup returns."""
    from nbankd.control import peers as peers_mod
    from nbankd.control.peers import Peer, PeerNames

    release = threading.Event()
    real = Peer.lookup

    def lookup(pid: int, uid: int, gid: int) -> Peer:
        if uid == 4242:
            release.wait(60)
        return real(pid, uid, gid)

    monkeypatch.setattr(peers_mod.Peer, "lookup", staticmethod(lookup))
    answered = {pid: threading.Event() for pid in (101, 102, 103)}  # by the peer's pid
    got: list[tuple[int, int]] = []

    def then(conn: socket.socket, peer: Peer | None, error: Exception | None) -> None:
        assert peer is not None, error
        got.append((peer.uid, peer.pid))
        conn.close()
        answered[peer.pid].set()

    names = PeerNames(then)
    pairs = [socket.socketpair(socket.AF_UNIX) for _ in range(3)]
    try:
        assert names.look_up(pairs[0][0], 101, 4242, 4242)
        assert names.look_up(pairs[1][0], 102, 4242, 4242)  # waits on the same lookup
        assert names.look_up(pairs[2][0], 103, 0, 0)
        assert answered[103].wait(30), "root's connection waited for another user's lookup"
        assert not answered[101].is_set() and not answered[102].is_set()
        assert names.known(7, 0, 0) is not None and names.known(7, 4242, 4242) is None
        release.set()
        assert answered[101].wait(30) and answered[102].wait(30)
    finally:
        release.set()
        for a, b in pairs:
            a.close()
            b.close()
    assert sorted(got) == [(0, 103), (4242, 101), (4242, 102)]
