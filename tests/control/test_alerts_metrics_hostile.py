"""Hostile review of alerts (what is told, when, and whether it gets out at all) and of
the metrics textfile, against a real daemon, a real SMTP server (aiosmtpd) and a real
webhook receiver. (The webhook's transport is reviewed in
test_alerts_webhook_hostile.py.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from fixtures.daemon import status_json, wait_for
from fixtures.webhooks import Hook
from nbankd.control.alert_rules import Condition, State, step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mailbox:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.mails: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(message_from_bytes(envelope.content))
        return "250 OK"

    def bodies(self) -> str:
        return "\n".join(str(m.get_payload(decode=True), "utf-8", "replace") for m in self.mails)


def _log_count(h: Any, event: str) -> int:
    return h.log_path.read_text(errors="replace").count(event) if h.log_path.exists() else 0


def _rejected_waiting(h: Any) -> int:
    return sum(e["in_rejected_folder"] for e in status_json(h)[1]["inboxes"])


# -- email: a file name that is not UTF-8 -------------------------------------------------


def test_a_non_utf8_rejected_name_does_not_silence_email_alerts(daemon_factory: Any) -> None:
    """Email alerts still go out (naming every rejection) when one rejected file's
    name is not UTF-8: a rig's odd byte must not switch off the lab's alerts."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        email = {
            "to": ["lab@example.org"],
            "from": "nbankd@rig3.example.org",
            "smtp": f"127.0.0.1:{controller.port}",
            "starttls": False,
        }
        alerts = {"email": email, "check_every": "0.3s", "group_wait": "0s"}
        h = daemon_factory(extra_config={"alerts": alerts})
        h.start()
        h.drop(b"odd name \xff.wav", b"a name that is not UTF-8 (Latin-1 from a rig)")
        wait_for(lambda: _rejected_waiting(h) == 1, 60, "the odd name rejected")
        h.drop("bad name.wav", b"a name the registry refuses")
        wait_for(lambda: _rejected_waiting(h) == 2, 60, "both inputs rejected")
        failed = _log_count(h, "alert check failed")
        # the next check either mails or fails: wait for one or the other
        wait_for(
            lambda: "bad name.wav" in box.bodies() or _log_count(h, "alert check failed") > failed,
            60,
            "the next alert check",
        )
        h.stop()
    finally:
        controller.stop()
    assert "bad name.wav" in box.bodies(), "no alert email at all: " + (
        "the alert check crashed" if _log_count(h, "alert check failed") else "?"
    )


# -- the metrics textfile: its temporary file ----------------------------------------------


class _Created(FileSystemEventHandler):
    """Keeps the names created in a watched folder (inotify, so no write is missed)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def on_created(self, event: FileSystemEvent) -> None:
        self.names.append(os.path.basename(os.fsdecode(event.src_path)))


def test_the_textfile_temporary_name_is_not_followed_when_a_link(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Whoever can write the textfile's folder cannot make the daemon write elsewhere:
    a link planted at the temporary file's name is never followed (SPEC 7: nothing is
    written outside the configured folders and the metrics file)."""
    folder = tmp_path / "node-exporter"
    folder.mkdir()
    textfile = folder / "nbankd.prom"
    precious = tmp_path / "precious.dat"  # e.g. a recording, or the daemon's journal
    precious.write_bytes(b"a user's bytes, outside every configured folder\n")
    seen = _Created()
    observer = InotifyObserver()
    observer.schedule(seen, str(folder))
    observer.start()
    h = daemon_factory(
        extra_config={"metrics": {"textfile": str(textfile), "textfile_every": "1s"}}
    )
    try:
        h.start()
        # every name the writer has used beside the textfile (prometheus_client's
        # write_to_textfile: PATH.PID.THREAD, the same at every write)
        first = wait_for(
            lambda: [n for n in seen.names if n != textfile.name],
            30,
            "the textfile's temporary file",
        )
        wait_for(lambda: os.path.lexists(textfile), 30, "the first write renamed in place")
        used = set(first)
        for name in used:  # planted between two writes, at each name used so far
            tmp = folder / name
            wait_for(lambda tmp=tmp: not os.path.lexists(tmp), 30, "the temporary name free")
            os.symlink(precious, tmp)
        before = os.lstat(textfile).st_ino
        wait_for(
            lambda: os.lstat(textfile).st_ino != before,
            30,
            "the next write of the textfile",
        )
    finally:
        observer.stop()
        observer.join()
    h.stop()
    assert precious.read_bytes() == b"a user's bytes, outside every configured folder\n"


# -- alert state across a restart ---------------------------------------------------------


def _webhook_alerts(hook: Hook, **extra: str) -> dict[str, Any]:
    return {"webhook": {"url": hook.url}, "check_every": "0.3s", "group_wait": "0s", **extra}


def test_a_problem_told_before_a_restart_and_gone_after_it_is_resolved(
    daemon_factory: Any, hook: Hook
) -> None:
    """A rejection told before a restart and removed while the daemon was down gets its
    "resolved" message after the restart (a chat or pager never shows it firing forever)."""
    h = daemon_factory(extra_config={"alerts": _webhook_alerts(hook)})
    h.start()
    h.drop("bad name.wav", b"a name the registry refuses")
    wait_for(
        lambda: any(str(a["path"]).endswith("bad name.wav") for a in hook.alerts()),
        60,
        "the rejection told",
    )
    h.stop()
    for path in h.rejected.iterdir():  # the lab cleans up during the maintenance window
        if path.name.startswith("bad name.wav"):
            path.unlink()
    told = len(hook.posts)
    h.start()
    h.drop("worse name.wav", b"another name the registry refuses")  # a check after restart
    wait_for(
        lambda: any(str(a["path"]).endswith("worse name.wav") for a in hook.alerts(told)),
        60,
        "the new rejection told",
    )
    h.stop()
    resolved = [a for a in hook.alerts(told) if a["state"] == "resolved"]
    assert any(str(a["path"]).endswith("bad name.wav") for a in resolved), hook.alerts(told)


def test_an_inbox_silent_since_before_a_restart_is_told_at_once(
    daemon_factory: Any, hook: Hook
) -> None:
    """expect_every counts from the inbox's last deposit, not from the daemon's start: a
    restart (an upgrade, a reboot) does not push the "silent" alert back."""
    every = 6.0
    h = daemon_factory(
        inbox_options={"expect_every": f"{every:g}s"},
        extra_config={"alerts": _webhook_alerts(hook)},
    )
    h.start()
    h.drop("last.wav", b"the rig's last recording before it died")
    h.wait_settled(1)
    deposited = time.time()
    h.stop()
    # the rig stays silent for longer than expect_every, then the host is restarted
    wait_for(lambda: time.time() > deposited + every + 0.5, every + 10, "expect_every to pass")
    told = len(hook.posts)
    restarted = time.monotonic()
    h.start()
    wait_for(
        lambda: any(a["kind"] == "silent" for a in hook.alerts(told)),
        every + 30,
        "the silent inbox told",
    )
    after = time.monotonic() - restarted
    h.stop()
    assert after < every / 2, (
        f"told {after:.1f}s after the restart, though the last deposit was "
        f"{every + 0.5:g}s+ before it: {[a['summary'] for a in hook.alerts(told)]}"
    )


# -- what makes status degraded, yet is never told ---------------------------------------


def _orphan_work_file(h: Any) -> None:
    (h.inbox / ".nbank" / "rec.wav").write_bytes(b"a user's recording, in a hidden folder")


def _rejected_folder_moved(h: Any) -> None:
    os.rename(h.rejected, h.inbox / "rejected.old")  # a writer renames it: deposits wait


def _state_dir_moved(h: Any) -> None:
    os.rename(h.state_dir, h.root / "state.old")


@pytest.mark.parametrize(
    "cause",
    [_orphan_work_file, _rejected_folder_moved, _state_dir_moved],
    ids=["orphan-work-file", "rejected-folder-moved", "state-dir-moved"],
)
def test_what_degrades_status_is_told(daemon_factory: Any, hook: Hook, cause: Any) -> None:
    """What makes nbankctl status degraded ("needs a person") reaches the alerts too:
    bytes nobody will deposit, an inbox whose deposits stopped, a daemon that stopped
    all claims."""
    h = daemon_factory(
        inbox_options={"expect_every": "1s"},  # a "silent" alert repeated every 1 s:
        extra_config={"alerts": _webhook_alerts(hook, repeat_every="1s")},  # the clock
    )
    h.start()
    wait_for(lambda: hook.posts, 30, "the first alert")
    before = set(status_json(h)[1]["degraded"])
    cause(h)
    wait_for(
        lambda: set(status_json(h)[1]["degraded"]) - before,
        60,
        "status to be degraded by the cause",
    )
    new_lines = set(status_json(h)[1]["degraded"]) - before
    seen = len(hook.posts)
    wait_for(lambda: len(hook.posts) >= seen + 2, 30, "two more checks")  # each repeats
    h.stop()
    kinds = {a["kind"] for a in hook.alerts(seen)}
    assert kinds - {"silent"}, f"status says {sorted(new_lines)}; alerts told only {kinds}"


# -- alert storms -------------------------------------------------------------------------


def test_problems_that_last_are_repeated_together_not_one_message_each() -> None:
    """48 rejected inputs left waiting (one came every 5 min) are repeated in a few
    messages a day, not in one message every 5 minutes forever."""
    hour = 3600.0
    state, present, day2 = State(), [], 0
    for i in range(int(48 * hour // 30)):  # a check every 30 s for two days
        now = i * 30.0
        if now < 4 * hour and i % 10 == 0:
            present.append(
                Condition(
                    f"rejected:/in/f{i}",
                    f"/in/f{i} was rejected",
                    "nbankctl explain",
                    kind="rejected",
                    inbox="/in",
                    path=f"/in/f{i}",
                )
            )
        state, message = step(state, present, now=now, repeat_every=4 * hour, group_wait=60)
        if message is not None and now >= 24 * hour:
            day2 += 1
    assert len(present) == 48
    assert day2 <= 2 * 24 / 4, f"{day2} messages on the second day, nothing new in them"


# -- a hostile or broken SMTP server ------------------------------------------------------


def test_an_smtp_server_that_trickles_its_greeting_cannot_hold_alerts_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """send_email gives up after about SEND_TIMEOUT even when the server keeps the
    connection alive with an endless greeting (the alert thread, webhook included,
    would wait on it forever)."""
    from nbankd.config.model import EmailConfig
    from nbankd.control import alerts
    from nbankd.control.alert_rules import Message, Tracked

    monkeypatch.setattr(alerts, "SEND_TIMEOUT", 1.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while not stop.wait(0.2):  # one continuation line at a time, never the last
                try:
                    conn.sendall(b"220-still greeting\r\n")
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    cfg = EmailConfig(
        to=("lab@example.org",), from_="nbankd@rig3.example.org",
        smtp=("127.0.0.1", listener.getsockname()[1]), starttls=False,
    )  # fmt: skip
    message = Message((Tracked(0.0, "x was rejected", "c", kind="rejected"),), ())
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            alerts.send_email(cfg, message, "rig3")
            outcome.append(None)
        except BaseException as err:  # reported below
            outcome.append(err)
        done.set()

    threading.Thread(target=send, daemon=True).start()
    finished = done.wait(5 * alerts.SEND_TIMEOUT)
    stop.set()
    listener.close()
    assert finished, "send_email still waiting on the SMTP server after 5 x SEND_TIMEOUT"


# -- metrics a restart or a crash makes useless -------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple[Any, ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_last_deposit_timestamp_survives_a_restart(daemon_factory: Any) -> None:
    """After a restart, nbankd_last_deposit_timestamp_seconds still gives the inbox's
    last deposit: absent, the shipped NbankdInboxSilent rule (time() - it > 2d) has no
    series and never fires for a rig that died before the restart."""
    port = _free_port()
    h = daemon_factory(extra_config={"metrics": {"listen": f"127.0.0.1:{port}"}})
    h.start()
    h.drop("last.wav", b"the rig's last recording before it died")
    h.wait_settled(1)
    key = ("nbankd_last_deposit_timestamp_seconds", (("inbox", str(h.inbox)),))
    before = wait_for(lambda: _scrape(port).get(key), 30, "the deposit's timestamp")
    h.stop()
    h.start()
    after = _scrape(port).get(key)
    h.stop()
    assert after == pytest.approx(before, abs=1.0), f"{key[0]} after a restart: {after}"


def test_the_shipped_rules_tell_a_stale_textfile() -> None:
    """The shipped rules tell when the textfile stops being rewritten: a crashed daemon's
    last textfile keeps saying "healthy, not degraded" to node_exporter forever, and
    absent(nbankd_queue_items) never fires for it."""
    import yaml

    rules = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "nbankd-rules.yml"
    exprs = [r["expr"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]]
    assert any("node_textfile_mtime_seconds" in e for e in exprs), exprs


# -- guard tests: these held up (they pass) -----------------------------------------------


def test_guard_email_headers_take_nothing_from_file_names() -> None:
    """GUARD (passes): a rejected name carrying CR/LF and a Bcc: line stays in the
    body; the mail goes to the configured recipient only, with the usual subject."""
    from nbankd.config.model import EmailConfig
    from nbankd.control.alert_rules import Message, Tracked
    from nbankd.control.alerts import send_email

    envelopes: list[Any] = []

    class Box(Mailbox):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            envelopes.append(envelope)
            return await super().handle_DATA(server, session, envelope)

    box = Box()
    controller = Controller(box, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        name = "/srv/inbox/x.wav\r\nBcc: thief@evil.example\r\nSubject: all fine"
        message = Message((Tracked(0.0, f"{name} was rejected", "c", kind="rejected"),), ())
        cfg = EmailConfig(
            to=("lab@example.org",), from_="nbankd@rig3.example.org",
            smtp=("127.0.0.1", controller.port), starttls=False,
        )  # fmt: skip
        send_email(cfg, message, "rig3")
    finally:
        controller.stop()
    [mail] = box.mails
    assert [e.rcpt_tos for e in envelopes] == [["lab@example.org"]]
    assert mail["Subject"] == "nbankd on rig3: 1 problem(s)" and mail["Bcc"] is None


@pytest.mark.parametrize("field", ["from", "to"])
def test_guard_email_addresses_with_line_breaks_are_refused(tmp_path: Path, field: str) -> None:
    """GUARD (passes): an address holding CR/LF (a header smuggled in) is a config error."""
    from nbankd import errors
    from nbankd.config.loader import load_config

    email = {"to": ["lab@example.org"], "from": "nbankd@rig3.example.org"}
    email[field] = "lab@example.org\r\nBcc: thief@evil.example"
    cfg = tmp_path / "nbankd.yaml"
    cfg.write_text(
        f"registry: embedded\nstate_dir: {tmp_path / 'state'}\n"
        f"archives: [{{name: a, path: {tmp_path / 'arch'}}}]\n"
        f"inboxes: [{{path: {tmp_path / 'inbox'}, archive: a, dtype: d}}]\n"
        + "alerts: "
        + json.dumps({"email": email})
        + "\n"
    )
    with pytest.raises(errors.ConfigError, match=f"alerts.email.{field}"):
        load_config(cfg)


def test_guard_label_values_are_escaped_in_the_exposition() -> None:
    """GUARD (passes): an inbox path with a quote, a backslash and a newline comes back
    whole from the exposition text (no sample forged, none lost)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from nbankd.control.metrics import families
    from nbankd.daemon.tally import Tally

    inbox = '/srv/in"box\\x\nnbankd_degraded 0'
    status = {"inboxes": [{"path": inbox, "in_flight": 1}], "degraded": ["x"]}

    class Collector:
        def collect(self) -> Any:
            return families(status, Tally())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert got[("nbankd_inbox_in_flight", (("inbox", inbox),))] == 1
    assert got[("nbankd_degraded", ())] == 1
