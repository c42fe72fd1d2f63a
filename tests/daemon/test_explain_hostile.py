"""Hostile review of ``nbankctl explain PATH``, as an inbox writer would meet it.

Every test runs the real ``nbankd`` and ``nbankctl``; ``.reason`` files and symbolic
links are written the way a local user who can write an inbox would.

Findings, fixed since: explain trusted the ``rejected_path`` of a ``.reason`` file on
disk (any path stat'ed, named and offered for requeue), followed a linked folder inside
an inbox (existence oracle), printed a reason's ``code`` raw in its readable output
(terminal escapes), and over the raw protocol answered a path holding a lone surrogate
with an internal error and resolved a relative path against the daemon's working
directory. The rest are guards.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, raw_explain, wait_for
from nbankctl import render


def _explain(h: DaemonHarness, path: str | Path) -> tuple[int, dict[str, Any]]:
    proc = nbankctl(h, "explain", "--json", str(path), timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def _tree(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime in ns) of every entry under ``roots``, links not followed."""
    out: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_forged_reason_file_cannot_point_explain_outside_the_rejected_folder(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A ``NAME.reason`` an inbox writer wrote into the rejected folder, naming a file
    elsewhere, makes explain name no path outside the rejected folder (nor tell whether
    that file exists, nor hand out a requeue command for it)."""
    secret = tmp_path / "private" / "grant-draft.docx"
    secret.parent.mkdir()
    secret.write_bytes(b"not the inbox writer's")
    h: DaemonHarness = daemon_factory()
    h.start()
    h.rejected.mkdir(exist_ok=True)
    forged = h.rejected / "planted.reason"
    forged.write_text(json.dumps({"code": "x", "message": "m", "rejected_path": str(secret)}))
    rc, doc = _explain(h, forged)
    assert rc == 0
    rejected_root = os.path.realpath(h.rejected) + "/"
    for key in ("rejected_path", "original_path"):
        value = doc.get(key)
        assert value is None or os.path.realpath(value).startswith(rejected_root), doc
    assert "requeue" not in doc, doc
    assert str(secret.name) not in doc["message"], doc


def test_forged_shortened_reason_naming_another_file_beside_it_is_not_taken(
    daemon_factory: Any,
) -> None:
    """A ``.reason`` planted in the rejected folder naming another file in that folder
    (not the one its name was made from) does not explain that file: the reason file
    is answered as a file nothing records."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.rejected.mkdir(exist_ok=True)
    (h.rejected / "victim.wav").write_bytes(b"someone else's")
    forged = h.rejected / "planted.reason"
    forged.write_text(
        json.dumps({"code": "x", "message": "m", "rejected_path": str(h.rejected / "victim.wav")})
    )
    rc, doc = _explain(h, forged)
    assert rc == 0
    assert doc["state"] == "in-rejected-folder", doc
    assert "requeue" not in doc and "victim" not in json.dumps(doc), doc


def test_a_long_rejected_name_is_explained_by_its_shortened_reason(daemon_factory: Any) -> None:
    """The shortened ``.reason`` of an input whose name is too long for the suffix is
    explained as that input's: rejected, its path, and the requeue command."""
    h: DaemonHarness = daemon_factory()
    h.start()
    long_name = "a b" + "c" * 248 + ".wav"  # 255 bytes, rejected for its space
    h.drop(long_name, b"rejected: a space in the name")
    h.wait_settled(1)
    [reason_file] = list(h.rejected.glob("*.reason"))
    assert reason_file.name != long_name + ".reason"
    rc, doc = _explain(h, reason_file)
    assert rc == 0
    assert doc["state"] == "rejected", doc
    assert doc["rejected_path"] == str(h.rejected / long_name)
    assert doc["reason"]["code"] == "invalid-name"
    assert "requeue" in doc


def test_a_reason_file_rewritten_on_disk_does_not_override_the_journal(
    daemon_factory: Any,
) -> None:
    """Explaining a rejected input whose ``NAME.reason`` an inbox writer rewrote shows
    the reason the journal recorded, not the file's."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("bad name.wav", b"rejected: a space in the name")
    h.wait_settled(1)
    reason_file = h.rejected / "bad name.wav.reason"
    reason_file.write_text(json.dumps({"code": "forged", "message": "all is well"}))
    rc, doc = _explain(h, h.rejected / "bad name.wav")
    assert rc == 0
    assert doc["state"] == "rejected", doc
    assert doc["reason"]["code"] == "invalid-name", doc
    assert "forged" not in doc["message"], doc


def test_human_explain_shows_no_terminal_escape_from_a_reason_file(
    daemon_factory: Any,
) -> None:
    """The readable ``nbankctl explain`` output holds no raw escape character, even when
    a ``NAME.reason`` an inbox writer put beside a file in the rejected folder (nothing
    journaled for it, so the file is all explain has) carries some in its code, message
    and hint: a reason cannot retitle or clear the admin's terminal."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.rejected.mkdir(exist_ok=True)
    (h.rejected / "planted.wav").write_bytes(b"x")
    reason = {"code": "x\x1b]0;owned\x07\x1b[2J", "message": "m\x1b[31m", "hint": "h\x1b[0m"}
    (h.rejected / "planted.wav.reason").write_text(json.dumps(reason))
    proc = nbankctl(h, "explain", str(h.rejected / "planted.wav"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "rejected" in proc.stdout and "owned" in proc.stdout
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout, repr(proc.stdout)


def test_readable_explain_escapes_every_field_of_the_answer() -> None:
    """Every text nbankctl prints from explain's answer (path, state, facts, reason,
    item, earlier deposit) shows control characters escaped."""
    evil = "e\x1b[2J\x07\x9b"
    answer: dict[str, Any] = {
        "path": evil,
        "state": "in-flight",
        "message": evil,
        "reason": {"code": evil, "message": evil, "hint": evil},
        "item": {"token": evil, "state": evil, "attempts": evil},
        "previous": {"state": evil, "id": evil},
        **{key: evil for key in ("inbox", "id", "url", "archive_file", "time")},
        **{key: evil for key in ("rejected_path", "original_path", "pattern", "belongs_to")},
    }
    text = render.explain(answer)
    assert text.count("e\\x1b[2J") == 19, text  # all but the state, which shows the item
    assert not any(c in text for c in "\x1b\x07\x9b"), repr(text)


def test_a_path_with_a_lone_surrogate_is_a_usage_error(daemon_factory: Any) -> None:
    """A raw explain request whose path holds a lone surrogate (no file name can) is
    answered as a usage error, as a NUL byte is, not as the daemon's own failure."""
    h: DaemonHarness = daemon_factory()
    h.start()
    reply = raw_explain(h, f"{h.inbox}/a\ud800.wav")
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "surrogate" in reply["error"]["message"]
    assert b"control command failed" not in h.log_path.read_bytes()


def test_a_relative_path_is_a_usage_error(daemon_factory: Any) -> None:
    """A raw explain request with a relative path is refused as a usage error, never
    resolved against the daemon's working directory."""
    h: DaemonHarness = daemon_factory()
    h.start()
    reply = raw_explain(h, "inbox/x.wav")
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "absolute" in reply["error"]["message"]


def test_explain_through_a_linked_folder_does_not_tell_whether_a_file_exists(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A symbolic link an inbox writer put in a sub-folder of a non-recursive inbox,
    pointing at a folder they cannot read, does not let explain tell an existing file
    there from a missing one (the daemon's user would follow the link for them)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "exists.txt").write_bytes(b"secret")
    h: DaemonHarness = daemon_factory(inbox_options={"recursive": False})
    h.inbox.mkdir()
    (h.inbox / "sub").mkdir()
    (h.inbox / "sub" / "lnk").symlink_to(private)
    h.start()
    rc1, there = _explain(h, h.inbox / "sub" / "lnk" / "exists.txt")
    rc2, missing = _explain(h, h.inbox / "sub" / "lnk" / "missing.txt")
    assert rc1 == rc2 == 0
    assert (there["state"], there["message"]) == (missing["state"], missing["message"])
    assert there["state"] == "unsupported" and "symbolic link" in there["message"], there


def test_explain_with_dotdot_out_of_the_inbox_is_not_in_an_inbox(daemon_factory: Any) -> None:
    """``INBOX/../elsewhere/FILE`` is answered as the path it resolves to: in no inbox."""
    h: DaemonHarness = daemon_factory()
    h.start()
    outside = h.root / "elsewhere"
    outside.mkdir()
    (outside / "f.wav").write_bytes(b"x")
    rc, doc = _explain(h, f"{h.inbox}/../elsewhere/f.wav")
    assert rc == 0
    assert doc["state"] == "not-in-inbox"
    assert doc["inbox"] is None


def test_explain_answers_odd_paths_briefly_and_changes_nothing(daemon_factory: Any) -> None:
    """Explaining a rejected input, its reason, a non-UTF-8 name, a path longer than
    PATH_MAX and the rejected folder itself answers each in a bounded reply, exit 0, and
    leaves every file and folder of the inbox and archive as it was."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("bad name.wav", b"rejected: a space in the name")
    h.drop("ok.wav", b"deposited")
    h.wait_settled(2)
    before = _tree(h.inbox, h.archive)
    paths = [
        str(h.rejected / "bad name.wav"),
        str(h.rejected / "bad name.wav.reason"),
        str(h.inbox / "bad name.wav"),
        str(h.inbox / "ok.wav"),
        str(h.rejected),
        os.fsdecode(os.fsencode(str(h.inbox)) + b"/\xff\xfe\x1b.wav"),
        str(h.inbox) + ("/" + "d" * 200) * 30 + "/f.wav",
    ]
    for path in paths:
        proc = nbankctl(h, "explain", path, timeout=60)
        assert proc.returncode == 0, (path[:80], proc.stderr)
        assert 0 < len(proc.stdout) < 20_000, path[:80]
        assert "\x1b" not in proc.stdout
    assert _tree(h.inbox, h.archive) == before


def test_explain_without_a_daemon_exits_3_naming_how_to_start_it(daemon_factory: Any) -> None:
    """With the daemon stopped, explain exits 3 promptly and says it is not running."""
    h: DaemonHarness = daemon_factory()
    h.write_config()
    started = time.monotonic()
    proc = nbankctl(h, "explain", str(h.inbox / "x.wav"), timeout=60)
    assert proc.returncode == 3
    assert "not running" in proc.stderr
    assert time.monotonic() - started < 15


def test_explain_of_an_input_being_deposited_says_in_flight(daemon_factory: Any) -> None:
    """An input whose deposit keeps failing after staging is explained as in flight,
    naming its attempt and last error in one bounded line."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_RAISE_AT": "after-stage"})
    h.drop("inflight.wav", os.urandom(50_000))
    wait_for(
        lambda: "after-stage" in h.log_path.read_text(errors="replace"),
        what="the item to fail after staging",
    )
    rc, doc = _explain(h, h.inbox / "inflight.wav")
    assert rc == 0
    assert doc["state"] == "in-flight", doc
    assert "being deposited" in doc["message"]
    assert "\n" not in doc["message"] and len(doc["message"]) < 4000
