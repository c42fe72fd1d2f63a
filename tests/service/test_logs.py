"""Logging set-up: format choice, JSON lines, redaction, stdlib routing, journal fields."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from nbankd.errors import ConfigError
from nbankd.service.logs import (
    configure_logging,
    get_logger,
    journal_available,
    journal_fields,
    journal_stream_matches,
    redact_secrets,
    redact_text,
    reset_logging,
    resolve_format,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    reset_logging()


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _file_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


# --- JSON lines ------------------------------------------------------------------------


def test_json_line_has_event_level_timestamp_and_fields() -> None:
    """A JSON line holds the event, level, an ISO UTC timestamp and the bound fields."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    get_logger(inbox="/srv/inbox/rig3").info("deposited", resource_id="a1b2c3d4", size=12)
    (line,) = _json_lines(out)
    assert line["event"] == "deposited"
    assert line["level"] == "info"
    assert line["inbox"] == "/srv/inbox/rig3"
    assert line["resource_id"] == "a1b2c3d4"
    assert line["size"] == 12
    assert ISO_UTC.match(str(line["timestamp"]))


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_file_name_that_is_not_utf8_is_logged_escaped(fmt: str) -> None:
    """A source name with undecodable bytes (surrogates) is written escaped to a strict
    UTF-8 stream, never raising; valid non-ASCII text is kept as it is."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    configure_logging(fmt, "info", out)
    get_logger().info("rejected", source="bad\udcff.wav", inbox="/srv/inbox/Zoë")
    text = raw.getvalue().decode("utf-8")
    if fmt == "json":
        (line,) = [json.loads(t) for t in text.splitlines()]
        text = f"{line['source']} {line['inbox']}"
    assert "bad\\udcff.wav" in text and "Zoë" in text


def test_one_line_per_event() -> None:
    """Each event is exactly one line, even with a newline in a value."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    log = get_logger()
    log.info("first", note="two\nlines")
    log.warning("second")
    assert [e["event"] for e in _json_lines(out)] == ["first", "second"]


def test_level_filters_lower_events() -> None:
    """Events below the configured level are not written."""
    out = io.StringIO()
    configure_logging("json", "warning", out)
    log = get_logger()
    log.info("quiet")
    log.debug("quieter")
    log.error("loud")
    assert [e["event"] for e in _json_lines(out)] == ["loud"]


def test_exception_is_rendered_in_json() -> None:
    """log.exception() records level error and the traceback text."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        get_logger().exception("copy failed")
    (line,) = _json_lines(out)
    assert line["level"] == "error"
    assert "RuntimeError: disk on fire" in str(line["exception"])


def test_logger_made_before_configure_follows_it() -> None:
    """A logger created at import time uses the configuration in force when it logs."""
    early = get_logger(item="a.wav")
    out = io.StringIO()
    configure_logging("json", "info", out)
    early.info("claimed")
    assert _json_lines(out)[0]["item"] == "a.wav"


def test_reconfigure_replaces_output() -> None:
    """Calling configure_logging again (reload) switches the output and level."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", first)
    configure_logging("json", "debug", second)
    get_logger().debug("after reload")
    assert first.getvalue() == ""
    assert _json_lines(second)[0]["event"] == "after reload"


def test_priority_prefix_when_stdout_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON lines get a <N> priority prefix when the stream is $JOURNAL_STREAM."""
    with open(tmp_path / "journal-stream", "w+") as out:
        monkeypatch.setenv("JOURNAL_STREAM", _file_id(out.fileno()))
        assert configure_logging("json", "info", out) == "json"
        log = get_logger()
        log.info("fine")
        log.error("bad")
        out.seek(0)
        lines = out.read().splitlines()
    assert lines[0].startswith("<6>{")
    assert lines[1].startswith("<3>{")
    assert json.loads(lines[1][3:])["event"] == "bad"


# --- console -------------------------------------------------------------------------


def test_console_rendering() -> None:
    """The console format renders the level, event and fields in one readable line."""
    out = io.StringIO()
    configure_logging("console", "info", out)
    get_logger().warning("archive unmounted", archive="birdsong")
    text = out.getvalue()
    assert "archive unmounted" in text
    assert "archive=birdsong" in text
    assert "warning" in text


# --- choosing the format ---------------------------------------------------------------


def test_auto_is_json_on_a_pipe() -> None:
    """auto resolves to json when the stream is not a terminal."""
    assert configure_logging("auto", "info", io.StringIO()) == "json"


def test_auto_is_console_on_a_tty() -> None:
    """auto resolves to console when the stream is a terminal (a real pty)."""
    controller, terminal = os.openpty()
    try:
        with open(terminal, "w", closefd=False) as tty:
            assert configure_logging("auto", "info", tty) == "console"
    finally:
        os.close(controller)
        os.close(terminal)


def test_auto_picks_journal_under_journal_stream(tmp_path: Path) -> None:
    """auto is journal when JOURNAL_STREAM names stdout/stderr and the extra is present."""
    with open(tmp_path / "stream", "w") as stream:
        env = {"JOURNAL_STREAM": _file_id(stream.fileno())}
        fds = [stream.fileno()]
        assert resolve_format("auto", stream, environ=env, have_journal=True, fds=fds) == (
            "journal"
        )
        assert resolve_format("auto", stream, environ=env, have_journal=False, fds=fds) == ("json")


def test_auto_ignores_inherited_journal_stream(tmp_path: Path) -> None:
    """A JOURNAL_STREAM naming some other file (inherited, output redirected) is ignored."""
    with open(tmp_path / "other", "w") as other, open(tmp_path / "stream", "w") as stream:
        env = {"JOURNAL_STREAM": _file_id(other.fileno())}
        got = resolve_format("auto", stream, environ=env, have_journal=True, fds=[stream.fileno()])
    assert got == "json"


@pytest.mark.parametrize("value", [None, "", "junk", "1:", ":2", "1:2:3"])
def test_journal_stream_malformed(value: str | None) -> None:
    """A missing or malformed JOURNAL_STREAM never matches."""
    assert journal_stream_matches(value, [0, 1, 2]) is False


def test_explicit_journal_without_extra_is_a_config_error() -> None:
    """format journal without systemd-python fails, naming the extra and build needs."""
    with pytest.raises(ConfigError) as caught:
        resolve_format("journal", io.StringIO(), environ={}, have_journal=False)
    text = str(caught.value)
    assert "nbankd[systemd]" in text
    assert "libsystemd-dev" in text
    assert "pkg-config" in text
    assert caught.value.exit_code == 2


def test_configure_journal_without_extra_fails() -> None:
    """configure_logging('journal') raises ConfigError when the extra is missing (in a
    child process whose imports of ``systemd`` fail, whether or not it is installed)."""
    script = (
        "import io, sys\n"
        "sys.modules['systemd'] = None\n"
        "from nbankd.errors import ConfigError\n"
        "from nbankd.service.logs import configure_logging\n"
        "try:\n"
        "    configure_logging('journal', 'info', io.StringIO())\n"
        "except ConfigError as err:\n"
        "    print('ConfigError:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError:") and "systemd extra" in out.stdout


def test_unknown_format_is_a_config_error() -> None:
    """An unknown log.format names the key and the accepted values."""
    with pytest.raises(ConfigError, match=r"log\.format: 'xml'.*auto, journal, json, console"):
        configure_logging("xml", "info", io.StringIO())


def test_unknown_level_is_a_config_error() -> None:
    """An unknown log.level names the key and the accepted values."""
    with pytest.raises(ConfigError, match=r"log\.level: 'verbose'"):
        configure_logging("json", "verbose", io.StringIO())


# --- redaction -------------------------------------------------------------------------


def test_redaction_in_json_output() -> None:
    """password=, Authorization and URL passwords never reach the output."""
    out = io.StringIO()
    configure_logging("json", "debug", out)
    log = get_logger()
    log.info("login", password="secret")
    log.info("headers", headers={"Authorization": "Basic secret"})
    log.info("registry", url="http://user:secret@host/neurobank/")
    log.info("text password=secret and Authorization: Bearer secret")
    log.info("connecting to https://dmeliza:secret@registry.example/neurobank/")
    text = out.getvalue()
    assert "secret" not in text
    assert "http://user:[redacted]@host/neurobank/" in text
    assert len(_json_lines(out)) == 5


def test_redaction_in_tracebacks() -> None:
    """A secret inside an exception message is hidden in the rendered traceback."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    try:
        raise ConnectionError("cannot reach http://u:secret@registry/")
    except ConnectionError as err:
        get_logger().exception("registry down", error=err)
    assert "secret" not in out.getvalue()
    assert "registry down" in out.getvalue()


@pytest.mark.parametrize(
    "key",
    ["password", "registry_auth", "Authorization", "credentials", "token", "api_key", "passwd"],
)
def test_secret_keys_are_redacted(key: str) -> None:
    """Any key named like a password, auth, credentials or token is replaced whole."""
    event = redact_secrets(None, "info", {"event": "x", key: "hunter2", "user": "dmeliza"})
    assert event[key] == "[redacted]"
    assert event["user"] == "dmeliza"


def test_booleans_under_secret_keys_stay() -> None:
    """A boolean cannot hold a secret, so authorized=True stays readable."""
    event = redact_secrets(None, "info", {"event": "x", "authorized": True, "token": None})
    assert event == {"event": "x", "authorized": True, "token": None}


def test_redaction_looks_into_nested_values() -> None:
    """Secrets in nested mappings and lists are hidden too."""
    event = redact_secrets(
        None,
        "info",
        {"event": "x", "cfg": {"registry": {"password": "p"}, "urls": ["ftp://a:b@c/"]}},
    )
    assert event["cfg"] == {
        "registry": {"password": "[redacted]"},
        "urls": ["ftp://a:[redacted]@c/"],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://host/path", "http://host/path"),
        ("http://user@host/", "http://user@host/"),
        ("https://u:p%40ss@h:8000/x", "https://u:[redacted]@h:8000/x"),
        ("password=abc def", "password=[redacted] def"),
        ("token: abc", "token: [redacted]"),
        ("{'Authorization': 'Basic dXNlcjpwYXNz'}", "{'Authorization': '[redacted]'}"),
        ("3 files passed", "3 files passed"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    """Free text keeps its meaning with only the secret part replaced."""
    assert redact_text(text) == expected


def test_redaction_processor_keeps_other_fields() -> None:
    """capture_logs sees bound fields as given; the redaction processor leaves them intact."""
    with capture_logs() as logs:
        get_logger(inbox="/srv/inbox/rig3", item="a.wav").info("claimed", size=3)
    (entry,) = logs
    assert redact_secrets(None, "info", dict(entry)) == entry


# --- the standard logging module -------------------------------------------------------


def test_stdlib_warnings_go_to_the_same_output() -> None:
    """Stdlib records at warning and above are rendered as JSON lines with their logger."""
    out = io.StringIO()
    configure_logging("json", "debug", out)
    logging.getLogger("urllib3.connectionpool").warning("Retrying %s", "GET /", exc_info=False)
    logging.getLogger("watchdog.observers").info("not shown")
    (line,) = _json_lines(out)
    assert line["event"] == "Retrying GET /"
    assert line["logger"] == "urllib3.connectionpool"
    assert line["level"] == "warning"


def test_stdlib_records_are_redacted() -> None:
    """Secrets in stdlib log messages are hidden as well."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    logging.getLogger("urllib3").error("to http://u:secret@h/ failed")
    assert "secret" not in out.getvalue()


def test_stdlib_custom_level_maps_down() -> None:
    """A custom stdlib level (e.g. 35) is shown at the standard level below it."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    logging.getLogger("lib").log(35, "custom")
    assert _json_lines(out)[0]["level"] == "warning"


def test_reconfigure_keeps_one_bridge() -> None:
    """Configuring twice does not duplicate stdlib records."""
    out = io.StringIO()
    configure_logging("json", "info", io.StringIO())
    configure_logging("json", "info", out)
    logging.getLogger("lib").warning("once")
    assert len(_json_lines(out)) == 1


# --- journal fields ----------------------------------------------------------------------


def test_journal_fields_mapping() -> None:
    """Bound fields map to NBANK_* journal fields; MESSAGE, PRIORITY and identifier are set."""
    fields = journal_fields(
        {
            "event": "deposited",
            "level": "info",
            "timestamp": "2024-01-01T00:00:00Z",
            "resource_id": "a1b2c3d4",
            "inbox": "/srv/inbox/rig3",
            "item": "bird1/a.wav",
            "size": 1024,
            "verified": True,
            "sha1": None,
            "metadata": {"rig": "rig3"},
            "http-status": 503,
            "_record": object(),
        }
    )
    assert fields == {
        "MESSAGE": "deposited",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "nbankd",
        "NBANK_RESOURCE_ID": "a1b2c3d4",
        "NBANK_INBOX": "/srv/inbox/rig3",
        "NBANK_ITEM": "bird1/a.wav",
        "NBANK_SIZE": "1024",
        "NBANK_VERIFIED": "true",
        "NBANK_METADATA": '{"rig": "rig3"}',
        "NBANK_HTTP_STATUS": "503",
    }


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        ("debug", "7"),
        ("info", "6"),
        ("warning", "4"),
        ("warn", "4"),
        ("error", "3"),
        ("exception", "3"),
        ("critical", "2"),
    ],
)
def test_journal_priority_from_level(level: str, priority: str) -> None:
    """PRIORITY follows syslog: debug 7, info 6, warning 4, error 3, critical 2."""
    assert journal_fields({"event": "x", "level": level})["PRIORITY"] == priority


def test_journal_message_carries_traceback_and_callsite() -> None:
    """The traceback is appended to MESSAGE and callsite keys become CODE_* fields."""
    fields = journal_fields(
        {
            "event": "copy failed",
            "level": "error",
            "exception": "Traceback ...\nOSError: EIO",
            "pathname": "/x/deposit.py",
            "lineno": 12,
            "func_name": "publish",
        }
    )
    assert fields["MESSAGE"] == "copy failed\nTraceback ...\nOSError: EIO"
    assert fields["CODE_FILE"] == "/x/deposit.py"
    assert fields["CODE_LINE"] == "12"
    assert fields["CODE_FUNC"] == "publish"


def test_journal_fields_cannot_override_trusted_fields() -> None:
    """A bound 'message' or 'priority' key is namespaced, never replacing journald's own."""
    fields = journal_fields({"event": "x", "level": "info", "message": "m", "priority": 0})
    assert fields["MESSAGE"] == "x"
    assert fields["PRIORITY"] == "6"
    assert fields["NBANK_MESSAGE"] == "m"
    assert fields["NBANK_PRIORITY"] == "0"


def test_structlog_default_config_is_restored() -> None:
    """reset_logging() leaves structlog on its defaults (so tests do not leak config)."""
    configure_logging("json", "info", io.StringIO())
    reset_logging()
    assert structlog.is_configured() is False


# --- the journal chain, end to end -------------------------------------------------------


class _JournalStandIn:
    """Stands in for the third-party ``systemd.journal`` module: records send() calls."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[dict[str, str]] = []
        self.fail = fail

    def send(
        self,
        MESSAGE: str,
        MESSAGE_ID: str | None = None,
        CODE_FILE: str | None = None,
        CODE_LINE: int | None = None,
        CODE_FUNC: str | None = None,
        **fields: str,
    ) -> None:
        """Same signature and argument checks as systemd-python's journal.send."""
        if self.fail:
            raise OSError("journald socket missing")
        entry = {"MESSAGE": MESSAGE, **fields}
        for key, value in (("CODE_FILE", CODE_FILE), ("CODE_FUNC", CODE_FUNC)):
            if value is not None:
                entry[key] = value
        if CODE_LINE is not None:
            entry["CODE_LINE"] = format(CODE_LINE, "d")  # the real send needs an int
        self.sent.append(entry)


@pytest.fixture
def journal_standin(monkeypatch: pytest.MonkeyPatch) -> _JournalStandIn:
    """Installs the stand-in as ``systemd.journal`` for one test."""
    standin = _JournalStandIn()
    package = types.ModuleType("systemd")
    package.journal = standin  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.journal", standin)  # type: ignore[arg-type]
    return standin


def test_journal_chain_sends_mapped_fields(journal_standin: _JournalStandIn) -> None:
    """format journal sends MESSAGE, PRIORITY, NBANK_* fields and the caller's CODE_*."""
    assert configure_logging("journal", "info") == "journal"
    get_logger(inbox="/srv/inbox/rig3").warning(
        "deposit waits", resource_id="a1b2c3d4", password="hunter2"
    )
    (fields,) = journal_standin.sent
    assert fields["MESSAGE"] == "deposit waits"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "nbankd"
    assert fields["NBANK_RESOURCE_ID"] == "a1b2c3d4"
    assert fields["NBANK_INBOX"] == "/srv/inbox/rig3"
    assert fields["NBANK_PASSWORD"] == "[redacted]"
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_FUNC"] == "test_journal_chain_sends_mapped_fields"
    assert int(fields["CODE_LINE"]) > 0
    assert "NBANK_TIMESTAMP" not in fields


def test_journal_chain_routes_stdlib(journal_standin: _JournalStandIn) -> None:
    """Stdlib warnings reach the journal with the stdlib caller as CODE_FUNC."""
    configure_logging("journal", "info")
    logging.getLogger("watchdog.observers").error("inotify limit reached")
    (fields,) = journal_standin.sent
    assert fields["MESSAGE"] == "inotify limit reached"
    assert fields["PRIORITY"] == "3"
    assert fields["NBANK_LOGGER"] == "watchdog.observers"
    assert fields["CODE_FUNC"] == "test_journal_chain_routes_stdlib"


def test_auto_uses_journal_with_extra_under_journal_stream(
    journal_standin: _JournalStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto picks the journal when stderr is $JOURNAL_STREAM and the module imports."""
    monkeypatch.setenv("JOURNAL_STREAM", _file_id(2))
    assert configure_logging("auto", "info", io.StringIO()) == "journal"


def test_journal_unreachable_falls_back_to_stderr(
    journal_standin: _JournalStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    """If journald cannot be reached, the entry is written to stderr, not lost."""
    journal_standin.fail = True
    configure_logging("journal", "info")
    get_logger().error("still here", item="a.wav")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["MESSAGE"] == "still here"
    assert line["NBANK_ITEM"] == "a.wav"


# --- a real journald (CI step with the systemd extra; `pytest -m journald`) --------------

# Runs inside a private mount namespace (unshare -m): tmpfs over /run and the persistent
# journal folder, so the hand-started journald and its sockets are visible to this helper
# only. Prints journalctl's JSON entries for the resource id given in argv[1].
_JOURNALD_HELPER = r"""
import json, os, socket, subprocess, sys
rid = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
if os.path.isdir("/var/log/journal"):
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
os.makedirs("/run/systemd/journal")
ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
ready.bind("/run/nbankd-test-notify")
ready.settimeout(30)
journald = subprocess.Popen(
    ["/lib/systemd/systemd-journald"],
    env={**os.environ, "NOTIFY_SOCKET": "/run/nbankd-test-notify"},
)
try:
    while b"READY=1" not in ready.recv(4096).split(b"\n"):
        pass
    from nbankd.service.logs import configure_logging, get_logger
    assert configure_logging("journal", "info") == "journal"
    get_logger(inbox="/srv/inbox/rig3", item="bird1/a.wav").info(
        "deposited", resource_id=rid, password="hunter2"
    )
    subprocess.run(["journalctl", "--sync"], check=True)
    out = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", f"NBANK_RESOURCE_ID={rid}"],
        check=True, capture_output=True, text=True,
    ).stdout
    sys.stdout.write(out)
finally:
    journald.terminate()
    journald.wait(timeout=30)
"""


@pytest.mark.journald
def test_real_journald_receives_structured_fields() -> None:
    """Entries reach a real journald, queryable with journalctl NBANK_RESOURCE_ID=..."""
    if not journal_available():
        pytest.fail("the journald test needs the systemd extra: pip install -e '.[systemd]'")
    for tool in ("/lib/systemd/systemd-journald", shutil.which("unshare"), "/usr/bin/journalctl"):
        if tool is None or not os.path.exists(tool):
            pytest.fail(
                f"the journald test needs {tool or 'unshare'} (Debian: systemd, util-linux)"
            )
    rid = f"t{os.getpid()}x{time.monotonic_ns() % 10**9}"
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            _JOURNALD_HELPER,
            rid,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert entry["MESSAGE"] == "deposited"
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "nbankd"
    assert entry["NBANK_RESOURCE_ID"] == rid
    assert entry["NBANK_INBOX"] == "/srv/inbox/rig3"
    assert entry["NBANK_ITEM"] == "bird1/a.wav"
    assert entry["NBANK_PASSWORD"] == "[redacted]"
    assert entry["_TRANSPORT"] == "journal"
    assert entry["CODE_FUNC"] == "<module>"


class _FailingStream(io.StringIO):
    """A text stream whose every write fails (stderr gone too)."""

    def write(self, text: str) -> int:
        raise OSError(32, "Broken pipe")


def test_journal_and_its_fallback_unreachable_never_raise(
    journal_standin: _JournalStandIn,
) -> None:
    """With journald and the fallback stream both failing, a log call returns quietly
    and the entry is counted as dropped."""
    from nbankd.service.logs import JournalLogger
    from nbankd.service.logwriter import OUTPUT

    journal_standin.fail = True
    before = OUTPUT.dropped
    JournalLogger(fallback=_FailingStream()).msg(MESSAGE="lost", PRIORITY="3")
    assert OUTPUT.dropped == before + 1
